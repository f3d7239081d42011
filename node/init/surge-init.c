/*
 * surge-init: PID 1 of every container sandbox, and the wrapper of every exec into one.
 *
 * Built static (`node/build.rs`: cc -static) because templates are arbitrary root filesystems
 * (busybox-static by default, no libc inside); the node daemon embeds it, writes it to
 * <data_dir>/bin/surge-init and crun bind-mounts it read-only at /dev/.surge-init.
 *
 *   surge-init init [CMD ARGS...]
 *       PID 1. With a command: runs it as its child, forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT,
 *       SIGUSR1, SIGUSR2 and SIGWINCH to it, reaps every child (orphans included) and exits with
 *       the command's status as a shell reports it (the code, or 128+N for signal N). On fd 3,
 *       when crun passed one (`init.status`), it writes "ok" once the command was executed, or
 *       why it could not be (the node reports a start failure, not an exit) before ending the
 *       sandbox with 127 (126 when it exists but cannot be run). Without a command (a long-lived sandbox): waits and reaps
 *       until SIGTERM/SIGINT/SIGHUP, then passes SIGTERM to everything left and exits 0 once
 *       it is gone (the node's stop kills what ignores it after the grace period).
 *
 *   surge-init pool
 *       PID 1 of a warm-pool sandbox (the node's `--warm-pool`): created ahead of any job, it
 *       waits for the job's process on fd 4 (a pipe only the node writes to), then becomes
 *       `surge-init init` for it. The message is "LEN\n" and LEN bytes of NUL-terminated strings:
 *       ARGC, the ARGC arguments of the command, then the environment (which replaces this
 *       process's own: the job's variables, not the pool's). Until it arrives SIGTERM ends it.
 *
 *   surge-init exec CMD ARGS...
 *       The first process of an exec (`crun exec --process`, with the sandbox's user, no
 *       capabilities and no_new_privs). fd 3 is a socket to the node: this process writes
 *       "r\n" once it runs and "x CODE SIGNAL\n" when the command ended; it reads "s N\n"
 *       (deliver signal N to the command's process group) and "k\n" (kill the command and
 *       everything it started). End of file on fd 3 (the node cancelled the exec, or went away)
 *       means "k". The command runs in its own session, so its process group is well defined;
 *       this process is a child subreaper, so what the command started and orphaned stays
 *       below it and a kill reaches every descendant, whatever its process group. When the
 *       command ends normally, what it left running in the background is handed to PID 1.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

/* The descriptor crun passes with --preserve-fds=1. */
#define PASSED_FD 3
/* Descendants one kill pass can track (the sandbox's pids limit is 4096). */
#define TREE_MAX 16384

static const int forwarded[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH};
#define FORWARDED_N (sizeof forwarded / sizeof forwarded[0])

static sigset_t original_mask;

static void on_signal(int sig) { (void)sig; }

static void die(const char *what) {
    dprintf(2, "surge-init: %s: %s\n", what, strerror(errno));
    _exit(125);
}

/* Block the signals we handle and read them from a signalfd. A handler is installed (a no-op)
 * because the kernel drops default-disposition signals sent to a PID namespace's init. */
static int signal_fd(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    for (size_t i = 0; i < FORWARDED_N; i++) {
        sigaddset(&set, forwarded[i]);
        sigaction(forwarded[i], &sa, NULL);
    }
    sigaction(SIGCHLD, &sa, NULL);
    if (sigprocmask(SIG_BLOCK, &set, &original_mask) != 0) die("sigprocmask");
    int fd = signalfd(-1, &set, SFD_CLOEXEC);
    if (fd < 0) die("signalfd");
    return fd;
}

static int is_forwarded(int sig) {
    for (size_t i = 0; i < FORWARDED_N; i++)
        if (forwarded[i] == sig) return 1;
    return 0;
}

/* Fork and exec argv; the child gets the original signal mask (handlers reset on exec) and,
 * when asked, its own session. Returns the pid, or -1 with *exec_errno set when the command
 * could not be executed (learned through a close-on-exec pipe: EOF means it ran). */
static pid_t spawn(char **argv, int new_session, int *exec_errno) {
    int p[2];
    if (pipe2(p, O_CLOEXEC) != 0) die("pipe2");
    pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid == 0) {
        sigprocmask(SIG_SETMASK, &original_mask, NULL);
        if (new_session) setsid();
        execvp(argv[0], argv);
        int e = errno;
        ssize_t w = write(p[1], &e, sizeof e);
        (void)w;
        _exit(e == ENOENT ? 127 : 126);
    }
    close(p[1]);
    int e = 0;
    ssize_t n;
    do {
        n = read(p[0], &e, sizeof e);
    } while (n < 0 && errno == EINTR);
    close(p[0]);
    if (n == (ssize_t)sizeof e) {
        int st;
        while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
        }
        *exec_errno = e;
        return -1;
    }
    return pid;
}

static int shell_status(int st) {
    if (WIFEXITED(st)) return WEXITSTATUS(st);
    if (WIFSIGNALED(st)) return 128 + WTERMSIG(st);
    return 255;
}

static int fd_is_open(int fd) { return fcntl(fd, F_GETFD) != -1; }

/* ---- PID 1 ---- */

static int run_init(char **cmd) {
    int start_err = fd_is_open(PASSED_FD) ? PASSED_FD : -1;
    if (start_err >= 0) fcntl(start_err, F_SETFD, FD_CLOEXEC);
    int sfd = signal_fd();
    pid_t child = 0;
    if (cmd[0] != NULL) {
        int e = 0;
        child = spawn(cmd, 0, &e);
        if (child < 0) {
            dprintf(2, "surge-init: cannot run `%s`: %s\n", cmd[0], strerror(e));
            if (start_err >= 0) dprintf(start_err, "cannot run `%s`: %s\n", cmd[0], strerror(e));
            return e == ENOENT ? 127 : 126;
        }
    }
    /* The node holds the sandbox as starting until this line is there. */
    if (start_err >= 0) {
        dprintf(start_err, "ok\n");
        close(start_err);
    }
    int stopping = 0;
    for (;;) {
        struct signalfd_siginfo si;
        ssize_t n = read(sfd, &si, sizeof si);
        if (n != (ssize_t)sizeof si) {
            if (n < 0 && errno == EINTR) continue;
            die("read signalfd");
        }
        int sig = (int)si.ssi_signo;
        if (sig == SIGCHLD) {
            for (;;) {
                int st;
                pid_t p = waitpid(-1, &st, WNOHANG);
                if (p > 0) {
                    if (p == child) return shell_status(st);
                    continue;
                }
                if (p < 0 && errno == EINTR) continue;
                if (p < 0 && errno == ECHILD && stopping) return 0;
                break;
            }
        } else if (is_forwarded(sig)) {
            if (child > 0) {
                kill(child, sig);
            } else if (sig == SIGTERM || sig == SIGINT || sig == SIGHUP) {
                stopping = 1;
                kill(-1, SIGTERM); /* every process of the namespace but this one */
                if (waitpid(-1, NULL, WNOHANG) < 0 && errno == ECHILD) return 0;
            }
        }
    }
}

/* ---- warm pool ---- */

/* The descriptor of the job's process spec in `surge-init pool`. */
#define SPEC_FD 4
/* Largest spec message (the node refuses larger specs before writing). */
#define SPEC_MAX (1 << 20)
/* Most arguments and environment entries taken from one spec. */
#define SPEC_STRINGS_MAX 8192

static void on_pool_term(int sig) {
    (void)sig;
    _exit(0);
}

static int read_full(int fd, char *buf, size_t len) {
    size_t got = 0;
    while (got < len) {
        ssize_t n = read(fd, buf + got, len - got);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        got += (size_t)n;
    }
    return 0;
}

static int run_pool(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_pool_term;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    char head[16];
    size_t used = 0;
    for (;;) {
        if (used == sizeof head - 1) _exit(125);
        if (read_full(SPEC_FD, head + used, 1) != 0) _exit(125); /* the node went away */
        if (head[used] == '\n') break;
        used++;
    }
    head[used] = '\0';
    long len = strtol(head, NULL, 10);
    if (len <= 0 || len > SPEC_MAX) _exit(125);
    char *buf = malloc((size_t)len + 1);
    if (buf == NULL || read_full(SPEC_FD, buf, (size_t)len) != 0) _exit(125);
    close(SPEC_FD);
    buf[len] = '\0';
    static char *strings[SPEC_STRINGS_MAX + 1];
    size_t n = 0;
    for (char *p = buf; p < buf + len && n < SPEC_STRINGS_MAX; p += strlen(p) + 1) strings[n++] = p;
    if (n == 0) _exit(125);
    long argc = strtol(strings[0], NULL, 10);
    if (argc < 0 || (size_t)argc + 1 > n) _exit(125);
    static char *argv[SPEC_STRINGS_MAX + 1];
    for (long i = 0; i < argc; i++) argv[i] = strings[1 + i];
    argv[argc] = NULL;
    clearenv();
    for (size_t i = (size_t)argc + 1; i < n; i++) putenv(strings[i]);
    sa.sa_handler = SIG_DFL;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    return run_init(argv);
}

/* ---- exec wrapper ---- */

static pid_t tree[TREE_MAX];
/* One task's children file: at most TREE_MAX pids of at most 7 digits and a space. */
static char children[TREE_MAX * 8 + 1];

/* SIGKILL every descendant of this process, breadth first through
 * /proc/PID/task/TID/children. */
static void kill_descendants(void) {
    size_t head = 0, len = 0;
    tree[len++] = getpid();
    while (head < len) {
        pid_t pid = tree[head++];
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
        DIR *tasks = opendir(path);
        if (tasks == NULL) continue;
        struct dirent *t;
        while ((t = readdir(tasks)) != NULL) {
            if (t->d_name[0] == '.') continue;
            char cpath[96];
            snprintf(cpath, sizeof cpath, "/proc/%d/task/%.16s/children", (int)pid, t->d_name);
            int fd = open(cpath, O_RDONLY | O_CLOEXEC);
            if (fd < 0) continue;
            size_t used = 0;
            for (;;) {
                ssize_t n = read(fd, children + used, sizeof children - 1 - used);
                if (n < 0 && errno == EINTR) continue;
                if (n <= 0) break;
                used += (size_t)n;
            }
            close(fd);
            children[used] = '\0';
            char *s = children, *end;
            for (;;) {
                long v = strtol(s, &end, 10);
                if (end == s) break;
                s = end;
                if (v <= 0) continue;
                kill((pid_t)v, SIGKILL);
                if (len < TREE_MAX) tree[len++] = (pid_t)v;
            }
        }
        closedir(tasks);
    }
}

static void report(int ctl, int code, int sig) {
    if (ctl >= 0) dprintf(ctl, "x %d %d\n", code, sig);
}

static int exit_report(int ctl, int st) {
    int sig = WIFSIGNALED(st) ? WTERMSIG(st) : 0;
    int code = shell_status(st);
    report(ctl, code, sig);
    return code;
}

/* Kill the command's process group and every descendant, reap them all, report the command's
 * status. Loops because a process that forked just before the kill leaves a child that only
 * shows up (re-parented to us: we are its subreaper) once its parent is gone. */
static int kill_tree(int ctl, pid_t child, int have_status, int status) {
    for (;;) {
        if (child > 0) kill(-child, SIGKILL);
        kill_descendants();
        int st;
        pid_t p = waitpid(-1, &st, 0);
        if (p < 0) {
            if (errno == EINTR) continue;
            break; /* ECHILD: nothing is left */
        }
        if (p == child && !have_status) {
            have_status = 1;
            status = st;
        }
    }
    if (!have_status) {
        report(ctl, 137, SIGKILL);
        return 137;
    }
    return exit_report(ctl, status);
}

static int run_exec(char **cmd) {
    if (cmd[0] == NULL) {
        dprintf(2, "surge-init: exec needs a command\n");
        return 125;
    }
    int ctl = fd_is_open(PASSED_FD) ? PASSED_FD : -1;
    if (ctl < 0) {
        dprintf(2, "surge-init: exec needs its control socket on fd %d\n", PASSED_FD);
        return 125;
    }
    fcntl(ctl, F_SETFD, FD_CLOEXEC);
    if (prctl(PR_SET_CHILD_SUBREAPER, 1) != 0) die("PR_SET_CHILD_SUBREAPER");
    int sfd = signal_fd();
    if (write(ctl, "r\n", 2) != 2) return 125; /* the node is gone already */
    int e = 0;
    pid_t child = spawn(cmd, 1, &e);
    if (child < 0) {
        dprintf(2, "surge-init: cannot run `%s`: %s\n", cmd[0], strerror(e));
        int code = e == ENOENT ? 127 : 126;
        report(ctl, code, 0);
        return code;
    }
    char line[64];
    size_t used = 0;
    for (;;) {
        struct pollfd fds[2] = {{.fd = sfd, .events = POLLIN}, {.fd = ctl, .events = POLLIN}};
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR) continue;
            die("poll");
        }
        if (fds[0].revents & POLLIN) {
            struct signalfd_siginfo si;
            if (read(sfd, &si, sizeof si) == (ssize_t)sizeof si) {
                int sig = (int)si.ssi_signo;
                if (sig == SIGCHLD) {
                    for (;;) {
                        int st;
                        pid_t p = waitpid(-1, &st, WNOHANG);
                        if (p == child) return exit_report(ctl, st);
                        if (p > 0 || (p < 0 && errno == EINTR)) continue;
                        break;
                    }
                } else if (is_forwarded(sig)) {
                    kill(-child, sig);
                }
            }
        }
        if (fds[1].revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t n = read(ctl, line + used, sizeof line - 1 - used);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) return kill_tree(-1, child, 0, 0); /* the node went away */
            used += (size_t)n;
            line[used] = '\0';
            char *nl;
            while ((nl = strchr(line, '\n')) != NULL) {
                *nl = '\0';
                if (line[0] == 'k') return kill_tree(ctl, child, 0, 0);
                if (line[0] == 's') {
                    long sig = strtol(line + 1, NULL, 10);
                    if (sig == SIGKILL) return kill_tree(ctl, child, 0, 0);
                    if (sig > 0 && sig < 65) kill(-child, (int)sig);
                }
                used -= (size_t)(nl + 1 - line);
                memmove(line, nl + 1, used + 1);
            }
            if (used == sizeof line - 1) used = 0; /* no message is that long: drop it */
        }
    }
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "init") == 0) return run_init(argv + 2);
    if (argc >= 2 && strcmp(argv[1], "exec") == 0) return run_exec(argv + 2);
    if (argc == 2 && strcmp(argv[1], "pool") == 0) return run_pool();
    dprintf(2, "usage: surge-init init [CMD ARGS...] | surge-init pool | surge-init exec CMD ARGS...\n");
    return 125;
}
