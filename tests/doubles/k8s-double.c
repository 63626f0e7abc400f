/*
 * Test double for the Kubernetes binaries (kubelet, kube-apiserver, ...): no
 * Kubernetes release can be downloaded on the test machines. Built static by the
 * tests and installed under each binary's name; records its arguments in
 * /var/log/kimg-doubles/NAME.args (one per line, "--" after each run) and stays up
 * like a daemon until killed. kubectl exits at once, except that, like the real one,
 * with `-f -` it reads its stdin (copied to /var/log/kimg-doubles/kubectl.stdin),
 * and with `-w` (a watch) it prints a header line and stays up until killed.
 *
 * kube-apiserver also listens on port 6443 of every address, like the real one.
 * A client that starts a TLS handshake gets one, with the cluster's real apiserver
 * certificate (/etc/kubernetes/pki from the PKI overlay), and "200 ok" to any
 * request: what /readyz answers, so the image's readiness wait (curl checked against
 * the cluster CA) is exercised as it is with the real apiserver. A client that
 * sends nothing first gets "kimg-double kube-apiserver\n" and is closed: the banner
 * lets a test see that the host's forward reaches it.
 *
 * Every double also appends its name to /var/log/kimg-doubles/order as it starts
 * (the start order); kube-apiserver adds "etcd=up" or "etcd=down": whether etcd
 * accepted a connection on 127.0.0.1:2379 when it started, as the real one needs.
 */
#include <netinet/in.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <sys/socket.h>
#include <libgen.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int tcp_up(int port) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int ok = s >= 0 && connect(s, (struct sockaddr *)&a, sizeof a) == 0;
    if (s >= 0)
        close(s);
    return ok;
}

/* Answers one connection to the apiserver double: TLS if the client speaks first
 * with a handshake record (0x16), else the banner. */
static void serve_apiserver(int c, SSL_CTX *ctx) {
    struct pollfd p = {.fd = c, .events = POLLIN};
    unsigned char first = 0;
    if (ctx && poll(&p, 1, 2000) == 1 && recv(c, &first, 1, MSG_PEEK) == 1 && first == 0x16) {
        SSL *ssl = SSL_new(ctx);
        SSL_set_fd(ssl, c);
        if (SSL_accept(ssl) == 1) {
            char req[4096];
            (void)SSL_read(ssl, req, sizeof req);
            static const char ok[] =
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
                "Connection: close\r\n\r\nok";
            SSL_write(ssl, ok, sizeof ok - 1);
            SSL_shutdown(ssl);
        }
        SSL_free(ssl);
    } else {
        static const char banner[] = "kimg-double kube-apiserver\n";
        (void)!write(c, banner, sizeof banner - 1);
    }
    close(c);
}

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
    if (strcmp(name, "kubectl") == 0) {
        for (int i = 1; i < argc; i++) {
            if (strcmp(argv[i], "-f") == 0 && i + 1 < argc && strcmp(argv[i + 1], "-") == 0) {
                FILE *in = fopen("/var/log/kimg-doubles/kubectl.stdin", "a");
                char buf[4096];
                size_t n;
                while ((n = fread(buf, 1, sizeof buf, stdin)) > 0)
                    if (in)
                        fwrite(buf, 1, n, in);
                if (in)
                    fclose(in);
            }
            if (strcmp(argv[i], "-w") == 0) {
                printf("NAME   READY   STATUS   RESTARTS   AGE\n");
                fflush(stdout);
                for (;;)
                    pause();
            }
        }
        return 0;
    }
    FILE *o = fopen("/var/log/kimg-doubles/order", "a");
    if (o) {
        if (strcmp(name, "kube-apiserver") == 0)
            fprintf(o, "%s etcd=%s\n", name, tcp_up(2379) ? "up" : "down");
        else
            fprintf(o, "%s\n", name);
        fclose(o);
    }
    if (strcmp(name, "kube-apiserver") == 0) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        int one = 1;
        struct sockaddr_in a = {0};
        a.sin_family = AF_INET;
        a.sin_port = htons(6443);
        a.sin_addr.s_addr = htonl(INADDR_ANY);
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
        if (ctx &&
            (SSL_CTX_use_certificate_chain_file(ctx, "/etc/kubernetes/pki/apiserver.crt") != 1 ||
             SSL_CTX_use_PrivateKey_file(ctx, "/etc/kubernetes/pki/apiserver.key",
                                         SSL_FILETYPE_PEM) != 1)) {
            SSL_CTX_free(ctx);
            ctx = NULL;
        }
        if (s >= 0 && bind(s, (struct sockaddr *)&a, sizeof a) == 0 && listen(s, 16) == 0)
            for (;;) {
                int c = accept(s, NULL, NULL);
                if (c >= 0)
                    serve_apiserver(c, ctx);
            }
    }
    for (;;)
        pause();
}
