/* tptok - encode text to token ids, or decode ids to text, with a Hugging
 * Face tokenizer.json (a .zst-compressed one works too).
 *
 *   tptok encode TOKENIZER_JSON   < text     prints a JSON array of ids
 *   tptok decode TOKENIZER_JSON   < ids.json prints the text (no newline added)
 *
 * Encoding does not add BOS/EOS; special tokens written in the text are
 * recognised.  decode --skip-special drops special tokens. */
#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "runtime.h"

#define MAX_INPUT (256u << 20)

static void usage(FILE *f)
{
    fprintf(f, "usage: tptok encode TOKENIZER_JSON < text\n"
               "       tptok decode [--skip-special] TOKENIZER_JSON < ids.json\n"
               "The model's tokenizer on its own.  TOKENIZER_JSON: a Hugging Face tokenizer.json\n"
               "(or tokenizer.json.zst).  encode prints the ids as a JSON array (no BOS/EOS\n"
               "added); decode reads such an array and prints the text.\n"
               "\n"
               "  --skip-special   decode: leave special tokens out of the text (default: keep)\n"
               "  -h, --help       this help\n"
               "\n"
               "Examples:\n"
               "  echo -n 'Hello world' | tptok encode tokenizer.json\n"
               "  echo '[9707, 1879]' | tptok decode --skip-special tokenizer.json\n");
}

static int read_stdin(char **out, size_t *len)
{
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    if (!buf) return -1;
    for (;;) {
        if (n == cap) {
            if (cap > MAX_INPUT) { free(buf); return -2; }
            char *p = realloc(buf, cap * 2);
            if (!p) { free(buf); return -1; }
            buf = p;
            cap *= 2;
        }
        size_t r = fread(buf + n, 1, cap - n, stdin);
        n += r;
        if (r == 0) break;
    }
    if (ferror(stdin)) { free(buf); return -1; }
    *out = buf;
    *len = n;
    return 0;
}

static int encode(const tp_tokenizer *tok, const char *text, size_t len)
{
    int32_t *ids;
    size_t n;
    tp_err err;
    if (tp_tokenizer_encode(tok, text, len, &ids, &n, &err)) return cli_fail(&err);
    putchar('[');
    for (size_t i = 0; i < n; i++) printf(i ? ", %d" : "%d", (int)ids[i]);
    printf("]\n");
    free(ids);
    return 0;
}

static int decode(const tp_tokenizer *tok, const char *json, size_t len, bool skip_special)
{
    cJSON *arr = cJSON_ParseWithLength(json, len);
    if (!cJSON_IsArray(arr)) {
        cJSON_Delete(arr);
        return cli_failf("stdin: expected a JSON array of token ids");
    }
    size_t n = (size_t)cJSON_GetArraySize(arr), i = 0;
    int32_t *ids = malloc((n ? n : 1) * sizeof *ids);
    if (!ids) { cJSON_Delete(arr); return cli_failf("out of memory"); }
    for (const cJSON *e = arr->child; e; e = e->next, i++) {
        double v = e->valuedouble;
        if (!cJSON_IsNumber(e) || v != (double)(int64_t)v || v < INT32_MIN || v > INT32_MAX) {
            free(ids);
            cJSON_Delete(arr);
            return cli_failf("stdin: element %zu is not an integer token id", i);
        }
        ids[i] = (int32_t)v;
    }
    cJSON_Delete(arr);
    char *text;
    tp_err err;
    if (tp_tokenizer_decode(tok, ids, n, skip_special, &text, &err)) {
        free(ids);
        return cli_fail(&err);
    }
    fwrite(text, 1, strlen(text), stdout);
    free(text);
    free(ids);
    return 0;
}

int main(int argc, char **argv)
{
    cli_init("tptok", usage);
    if (argc >= 2 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))) {
        usage(stdout);
        return 0;
    }
    bool skip_special = false;
    int argi = 2;
    if (argc >= 3 && !strcmp(argv[1], "decode") && !strcmp(argv[2], "--skip-special")) {
        skip_special = true;
        argi = 3;
    }
    if (argc != argi + 1 || (strcmp(argv[1], "encode") && strcmp(argv[1], "decode"))) {
        usage(stderr);
        return 2;
    }
    const char *path = argv[argi];
    tp_tokenizer *tok;
    tp_err err;
    if (tp_tokenizer_load(&tok, path, &err)) return cli_fail(&err);
    char *in;
    size_t len;
    int r = read_stdin(&in, &len);
    if (r) {
        tp_tokenizer_free(tok);
        return cli_failf("%s", r == -2 ? "stdin: input too large" : "stdin: read error");
    }
    int rc = !strcmp(argv[1], "encode") ? encode(tok, in, len) : decode(tok, in, len, skip_special);
    free(in);
    tp_tokenizer_free(tok);
    if (rc == 0 && (fflush(stdout) != 0 || ferror(stdout))) return cli_failf("stdout: write error");
    return rc;
}
