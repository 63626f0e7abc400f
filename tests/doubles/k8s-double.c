/*
 * Test double for the Kubernetes binaries (kubelet, kube-apiserver, ...): no
 * Kubernetes release can be downloaded on the test machines. Built static by the
 * tests and installed under each binary's name; records its arguments in
 * /var/log/kimg-doubles/NAME.args (one per line, "--" after each run) and stays up
 * like a daemon until killed. kubectl exits at once.
 */
#include <libgen.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int main(int argc, char **argv) {
    const char *name = basename(argv[0]);
    char path[512];
    mkdir("/var/log/kimg-doubles", 0755);
    snprintf(path, sizeof path, "/var/log/kimg-doubles/%s.args", name);
    FILE *f = fopen(path, "a");
    if (f) {
        for (int i = 1; i < argc; i++)
            fprintf(f, "%s\n", argv[i]);
        fprintf(f, "--\n");
        fclose(f);
    }
    if (strcmp(name, "kubectl") == 0)
        return 0;
    for (;;)
        pause();
}
