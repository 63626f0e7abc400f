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
 * certificate (/etc/kubernetes/pki from the PKI overlay), and one answer, as the
 * real apiserver gives them:
 *   GET /readyz: "200 ok" to anyone, or 500 while /etc/kimg-double/hold-readyz
 *     exists (the control plane still starting);
 *   GET /api/v1/namespaces/default/serviceaccounts/default: 403 without a client
 *     certificate of the cluster CA in group system:masters (the admin's); else the
 *     service account, or 404 while /etc/kimg-double/hold-sa exists (the
 *     controller-manager has not made it yet);
 *   anything else: 404.
 * So the image's readiness wait (curl checked against the cluster CA) and `kimg run
 * --wait` (curl with the admin certificate) are exercised as with the real
 * apiserver, and a test holds them with an overlay and releases them with `rm`.
 * A client that sends nothing first gets "kimg-double kube-apiserver\n" and is
 * closed: the banner lets a test see that the host's forward reaches it.
 *
 * Every double also appends its name to /var/log/kimg-doubles/order as it starts
 * (the start order); kube-apiserver adds "etcd=up" or "etcd=down": whether etcd
 * accepted a connection on 127.0.0.1:2379 when it started, as the real one needs.
 */
#include <netinet/in.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <poll.h>
#include <sys/socket.h>
#include <libgen.h>
#include <signal.h>
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

#define PKI "/etc/kubernetes/pki/"
#define HOLD_READYZ "/etc/kimg-double/hold-readyz"
#define HOLD_SA "/etc/kimg-double/hold-sa"
#define SA_PATH "/api/v1/namespaces/default/serviceaccounts/default"

/* Whether the TLS client showed a certificate of the cluster CA in group
 * system:masters (the handshake already checked it against the CA). */
static int is_admin(SSL *ssl) {
    X509 *cert = SSL_get1_peer_certificate(ssl);
    char org[256] = "";
    if (cert) {
        X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_organizationName, org,
                                  sizeof org);
        X509_free(cert);
    }
    return cert && SSL_get_verify_result(ssl) == X509_V_OK && strcmp(org, "system:masters") == 0;
}

static void reply(SSL *ssl, int code, const char *reason, const char *type, const char *body) {
    char head[256];
    int n = snprintf(head, sizeof head,
                     "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                     "Connection: close\r\n\r\n",
                     code, reason, type, strlen(body));
    SSL_write(ssl, head, n);
    SSL_write(ssl, body, (int)strlen(body));
}

/* One request on an accepted TLS connection (see the top of the file). */
static void answer(SSL *ssl) {
    char req[4096], path[1024] = "";
    int n = SSL_read(ssl, req, sizeof req - 1);
    if (n <= 0)
        return;
    req[n] = 0;
    if (sscanf(req, "GET %1023s ", path) != 1) {
        reply(ssl, 405, "Method Not Allowed", "text/plain", "GET only\n");
        return;
    }
    path[strcspn(path, "?")] = 0;
    if (strcmp(path, "/readyz") == 0) {
        if (access(HOLD_READYZ, F_OK) == 0)
            reply(ssl, 500, "Internal Server Error", "text/plain",
                  "[-]etcd failed: held by " HOLD_READYZ "\nreadyz check failed\n");
        else
            reply(ssl, 200, "OK", "text/plain", "ok");
    } else if (strcmp(path, SA_PATH) == 0) {
        if (!is_admin(ssl))
            reply(ssl, 403, "Forbidden", "application/json",
                  "{\"kind\":\"Status\",\"reason\":\"Forbidden\",\"code\":403}");
        else if (access(HOLD_SA, F_OK) == 0)
            reply(ssl, 404, "Not Found", "application/json",
                  "{\"kind\":\"Status\",\"reason\":\"NotFound\",\"code\":404}");
        else
            reply(ssl, 200, "OK", "application/json",
                  "{\"kind\":\"ServiceAccount\",\"apiVersion\":\"v1\","
                  "\"metadata\":{\"name\":\"default\",\"namespace\":\"default\"}}");
    } else {
        reply(ssl, 404, "Not Found", "text/plain", "404 page not found\n");
    }
}

/* Answers one connection to the apiserver double: TLS if the client speaks first
 * with a handshake record (0x16), else the banner (the test's probe sends a newline).
 * A client gets 60 s to speak: under TCG on a loaded host a guest's curl can stall
 * for seconds between its connect and its ClientHello, and a banner and close then
 * would reset its handshake (curl: (35) Connection reset by peer), an answer the
 * real apiserver never gives. */
static void serve_apiserver(int c, SSL_CTX *ctx) {
    struct pollfd p = {.fd = c, .events = POLLIN};
    unsigned char first = 0;
    if (ctx && poll(&p, 1, 60000) == 1 && recv(c, &first, 1, MSG_PEEK) == 1 && first == 0x16) {
        SSL *ssl = SSL_new(ctx);
        SSL_set_fd(ssl, c);
        if (SSL_accept(ssl) == 1) {
            answer(ssl);
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
        if (ctx && (SSL_CTX_use_certificate_chain_file(ctx, PKI "apiserver.crt") != 1 ||
                    SSL_CTX_use_PrivateKey_file(ctx, PKI "apiserver.key", SSL_FILETYPE_PEM) != 1 ||
                    SSL_CTX_load_verify_locations(ctx, PKI "ca.crt", NULL) != 1)) {
            SSL_CTX_free(ctx);
            ctx = NULL;
        }
        /* Ask for a client certificate, as the real apiserver does (--client-ca-file),
         * without requiring one: /readyz is open to anyone. */
        if (ctx) {
            SSL_CTX_set_client_CA_list(ctx, SSL_load_client_CA_file(PKI "ca.crt"));
            SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
            /* curl resumes the TLS session for its next request; with peer
             * verification OpenSSL refuses that (an internal error alert) unless the
             * sessions have a context. */
            SSL_CTX_set_session_id_context(ctx, (const unsigned char *)"kimg", 4);
        }
        /* One child per connection, as the real one serves them concurrently: a
         * silent or stalled client holds up no other. Children are reaped by the
         * kernel (SIGCHLD ignored). */
        signal(SIGCHLD, SIG_IGN);
        if (s >= 0 && bind(s, (struct sockaddr *)&a, sizeof a) == 0 && listen(s, 64) == 0)
            for (;;) {
                int c = accept(s, NULL, NULL);
                if (c < 0)
                    continue;
                pid_t child = fork();
                if (child == 0) {
                    close(s);
                    serve_apiserver(c, ctx);
                    _exit(0);
                }
                if (child < 0) /* No child to be had: serve it here. */
                    serve_apiserver(c, ctx);
                else
                    close(c);
            }
    }
    for (;;)
        pause();
}
