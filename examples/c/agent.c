/*
 * Ask an aiosfs agent one question with plain POSIX file I/O.
 *
 *   agent [-a AGENT_DIR] QUESTION...
 *
 * AGENT_DIR defaults to $AIOSFS_AGENT_DIR (set by the manifest supervisor). The words
 * of QUESTION are joined with spaces and written to AGENT_DIR/prompt; close() commits
 * the request (a refusal such as E2BIG or EINVAL is close()'s errno). Then the answer
 * is read from AGENT_DIR/output to EOF (a failed or cancelled job ends with an errno
 * read), AGENT_DIR/status is read, and the question, answer and status are appended
 * to AGENT_DIR/memory/log.txt. The answer goes to stdout.
 *
 * Exit status: 0 only when status starts with "done"; 1 when the job did not end
 * done or a file operation failed; 2 on a usage error.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PROG "agent"

struct buf {
    char *data;
    size_t len, cap;
};

static const char *errno_name(int err)
{
    switch (err) {
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case EINTR: return "EINTR";
    case EIO: return "EIO";
    case E2BIG: return "E2BIG";
    case EBADF: return "EBADF";
    case EAGAIN: return "EAGAIN";
    case ENOMEM: return "ENOMEM";
    case EACCES: return "EACCES";
    case EBUSY: return "EBUSY";
    case EEXIST: return "EEXIST";
    case ENOTDIR: return "ENOTDIR";
    case EISDIR: return "EISDIR";
    case EINVAL: return "EINVAL";
    case EFBIG: return "EFBIG";
    case ENOSPC: return "ENOSPC";
    case ESPIPE: return "ESPIPE";
    case ENAMETOOLONG: return "ENAMETOOLONG";
    case ENOTCONN: return "ENOTCONN";
    case EDQUOT: return "EDQUOT";
    case ECANCELED: return "ECANCELED";
    case ETIMEDOUT: return "ETIMEDOUT";
    default: return "E?";
    }
}

/* "agent: write /mnt/agents/x/prompt: E2BIG (Argument list too long)" */
static void fail(const char *what, const char *path, int err)
{
    fprintf(stderr, "%s: %s %s: %s (%s)\n", PROG, what, path, errno_name(err), strerror(err));
}

static int buf_add(struct buf *b, const char *data, size_t len)
{
    if (b->len + len + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + len + 1)
            cap *= 2;
        char *grown = realloc(b->data, cap);
        if (grown == NULL)
            return -1;
        b->data = grown;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, len);
    b->len += len;
    b->data[b->len] = '\0';
    return 0;
}

static int write_all(int fd, const char *data, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, data, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Read fd to EOF into b (and to stdout when echo). -1 with errno on a read error:
 * for output, the errno of a failed or cancelled job, after its partial answer. */
static int read_all(int fd, struct buf *b, int echo)
{
    char chunk[4096];
    for (;;) {
        ssize_t n = read(fd, chunk, sizeof chunk);
        if (n == 0)
            return 0;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (buf_add(b, chunk, (size_t)n) < 0) {
            errno = ENOMEM;
            return -1;
        }
        if (echo && write_all(STDOUT_FILENO, chunk, (size_t)n) < 0)
            return -1;
    }
}

static char *join_path(const char *dir, const char *name)
{
    size_t len = strlen(dir) + strlen(name) + 2;
    char *path = malloc(len);
    if (path != NULL)
        snprintf(path, len, "%s/%s", dir, name);
    return path;
}

/* The whole of a small file, or NULL (reported). */
static char *slurp(const char *path)
{
    struct buf b = {0};
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        fail("open", path, errno);
        return NULL;
    }
    if (read_all(fd, &b, 0) < 0) {
        fail("read", path, errno);
        close(fd);
        free(b.data);
        return NULL;
    }
    close(fd);
    if (b.data == NULL && buf_add(&b, "", 0) < 0)
        return NULL;
    return b.data;
}

/* Write the question to prompt; close() is where aiosfs accepts or refuses it:
 * -1 when the file could not be written, -2 when the request was refused. */
static int submit(const char *path, const char *question)
{
    int fd = open(path, O_WRONLY);
    if (fd < 0) {
        fail("open", path, errno);
        return -1;
    }
    if (write_all(fd, question, strlen(question)) < 0) {
        fail("write", path, errno);
        close(fd);
        return -1;
    }
    if (close(fd) < 0) {
        fail("close (the request was refused)", path, errno);
        return -2;
    }
    return 0;
}

static int append_log(const char *path, const char *question, const char *answer, const char *status)
{
    struct buf entry = {0};
    int ok = buf_add(&entry, "Q: ", 3) == 0 && buf_add(&entry, question, strlen(question)) == 0 &&
             buf_add(&entry, "\nA: ", 4) == 0 && buf_add(&entry, answer, strlen(answer)) == 0;
    size_t len = entry.len;
    while (ok && len > 0 && entry.data[len - 1] == '\n')
        entry.len = --len; /* the answer's final newline; one comes after */
    ok = ok && buf_add(&entry, "\nstatus: ", 9) == 0 && buf_add(&entry, status, strlen(status)) == 0;
    if (ok && entry.data[entry.len - 1] != '\n')
        ok = buf_add(&entry, "\n", 1) == 0;
    ok = ok && buf_add(&entry, "\n", 1) == 0;
    if (!ok) {
        fail("append to", path, ENOMEM);
        free(entry.data);
        return -1;
    }
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT, 0644);
    if (fd < 0) {
        fail("open", path, errno);
        free(entry.data);
        return -1;
    }
    int rc = 0;
    if (write_all(fd, entry.data, entry.len) < 0) {
        fail("write", path, errno);
        rc = -1;
    }
    if (close(fd) < 0 && rc == 0) { /* memory/ commits at close */
        fail("close", path, errno);
        rc = -1;
    }
    free(entry.data);
    return rc;
}

int main(int argc, char **argv)
{
    const char *dir = getenv("AIOSFS_AGENT_DIR");
    int first = 1;
    if (argc > 2 && strcmp(argv[1], "-a") == 0) {
        dir = argv[2];
        first = 3;
    }
    if (first >= argc || dir == NULL || dir[0] == '\0') {
        fprintf(stderr, "usage: %s [-a AGENT_DIR] QUESTION...\n(AGENT_DIR defaults to $AIOSFS_AGENT_DIR)\n", PROG);
        return 2;
    }

    struct buf question = {0};
    for (int i = first; i < argc; i++) {
        if ((i > first && buf_add(&question, " ", 1) < 0) || buf_add(&question, argv[i], strlen(argv[i])) < 0) {
            fprintf(stderr, "%s: out of memory\n", PROG);
            return 1;
        }
    }

    char *prompt = join_path(dir, "prompt"), *output = join_path(dir, "output");
    char *status_path = join_path(dir, "status"), *error_path = join_path(dir, "error");
    char *log_path = join_path(dir, "memory/log.txt");
    if (!prompt || !output || !status_path || !error_path || !log_path) {
        fprintf(stderr, "%s: out of memory\n", PROG);
        return 1;
    }

    int submitted = submit(prompt, question.data);
    if (submitted == -1)
        return 1;
    if (submitted == -2) {
        char *why = slurp(error_path);
        if (why != NULL && why[0] != '\0')
            fprintf(stderr, "%s: %s: %s", PROG, error_path, why);
        return 1;
    }

    /* output is bound at open() to this uid's latest job: the one just queued. */
    struct buf answer = {0};
    int job_errno = 0;
    int fd = open(output, O_RDONLY);
    if (fd < 0) {
        fail("open", output, errno);
        return 1;
    }
    if (read_all(fd, &answer, 1) < 0) {
        job_errno = errno;
        fail("read", output, job_errno);
    }
    close(fd);
    if (answer.data == NULL)
        buf_add(&answer, "", 0);

    char *status = slurp(status_path);
    if (status == NULL)
        return 1;
    if (job_errno != 0) {
        char *why = slurp(error_path);
        if (why != NULL && why[0] != '\0')
            fprintf(stderr, "%s: %s: %s", PROG, error_path, why);
    }
    int logged = append_log(log_path, question.data, answer.data ? answer.data : "", status);
    int done = strncmp(status, "done", 4) == 0;
    if (!done)
        fprintf(stderr, "%s: %s: %s", PROG, status_path, status);
    return done && logged == 0 ? 0 : 1;
}
