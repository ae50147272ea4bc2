/* golden_check.c: read a tinyrwkv golden folder's manifest.txt without a JSON parser and check
 * its files (docs/formats.md §8.2). A starting point for an implementation in C: where it says
 * "your model here", run yours and compare with the expected arrays read the same way.
 *
 *   cc -O2 -std=c99 -o golden_check examples/golden_check.c -lm
 *   ./golden_check DIR          (exit 0: every case checked; 1: a failure, printed)
 *
 * Checks: every model case's .bin files exist with the sizes its shapes give (ids int32 (T),
 * logits float64 (T, V), wkv (L, H, N, N), att_shift and ffn_shift (L, C), and init_/mid_ ones
 * when named), ids within [0, V), logits finite; every tokenizer case's id count; every sampling
 * case recomputed from its logits: the penalised logits, the allowed set and the probabilities.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAXF 64
static char dir[4096];
static int failures = 0;

typedef struct { int n; char *key[MAXF]; char *val[MAXF]; } Record;

static const char *get(const Record *r, const char *key) {
    for (int i = 0; i < r->n; i++) if (strcmp(r->key[i], key) == 0) return r->val[i];
    return NULL;
}
static long geti(const Record *r, const char *key) { const char *v = get(r, key); return v ? atol(v) : -1; }
static double getd(const Record *r, const char *key) { const char *v = get(r, key); return v ? atof(v) : NAN; }

static void fail(const char *name, const char *what) { printf("FAIL %s: %s\n", name, what); failures++; }

/* Read a whole .bin file; returns its size in bytes in *size (or -1). */
static void *read_bin(const char *file, long *size) {
    char path[8192];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    FILE *f = fopen(path, "rb");
    if (!f) { *size = -1; return NULL; }
    fseek(f, 0, SEEK_END); *size = ftell(f); fseek(f, 0, SEEK_SET);
    void *buf = malloc(*size ? *size : 1);
    if (fread(buf, 1, *size, f) != (size_t)*size) *size = -1;
    fclose(f);
    return buf;   /* the files are little-endian: this example assumes a little-endian machine */
}

static void *need(const Record *r, const char *key, long bytes) {
    const char *name = get(r, "name"), *file = get(r, key);
    char msg[256];
    if (!file) { snprintf(msg, sizeof msg, "no %s= field", key); fail(name, msg); return NULL; }
    long size; void *buf = read_bin(file, &size);
    if (size != bytes) {
        snprintf(msg, sizeof msg, "%s: %ld bytes, want %ld", file, size, bytes);
        fail(name, msg); free(buf); return NULL;
    }
    return buf;
}

/* Comma-separated integers -> array (returns the count). */
static int parse_ints(const char *s, long *out, int max) {
    int n = 0;
    while (s && *s && n < max) { out[n++] = strtol(s, (char **)&s, 10); if (*s == ',') s++; }
    return n;
}

static void check_model(const Record *r) {
    const char *name = get(r, "name");
    long L = geti(r, "L"), C = geti(r, "C"), H = geti(r, "H"), N = geti(r, "N"), V = geti(r, "V"),
         T = geti(r, "T"), split = geti(r, "split");
    if (L <= 0 || C != H * N || T <= 0 || split < 0 || split >= T) { fail(name, "bad shape fields"); return; }
    int *ids = need(r, "ids", 4 * T);
    double *logits = need(r, "logits", 8 * T * V);
    if (ids) for (long t = 0; t < T; t++) if (ids[t] < 0 || ids[t] >= V) { fail(name, "id out of range"); break; }
    if (logits) for (long i = 0; i < T * V; i++) if (!isfinite(logits[i])) { fail(name, "logit not finite"); break; }
    /* your model here: load get(r, "checkpoint") (storage=float32 or bf16), run ids[0:split]
       from the initial state (init=zero, or the init_* files), then ids[split:T] from the state
       it returned, and compare your logits and state with these (max|d| / std, kind=meta tol_*) */
    const char *prefixes[] = {"", "init_", "mid_"};
    for (int p = 0; p < 3; p++) {
        char key[64];
        if (p == 1 && strcmp(get(r, "init") ? get(r, "init") : "", "file") != 0) continue;
        if (p == 2 && split == 0) continue;
        snprintf(key, sizeof key, "%swkv", prefixes[p]); free(need(r, key, 8 * L * H * N * N));
        snprintf(key, sizeof key, "%satt_shift", prefixes[p]); free(need(r, key, 8 * L * C));
        snprintf(key, sizeof key, "%sffn_shift", prefixes[p]); free(need(r, key, 8 * L * C));
    }
    free(ids); free(logits);
}

static void check_tokenizer(const Record *r) {
    long ids[65536];
    int n = parse_ints(get(r, "ids"), ids, 65536);
    if (n != geti(r, "n_ids")) fail(get(r, "name"), "ids count is not n_ids");
    if (strlen(get(r, "text_hex") ? get(r, "text_hex") : "x") % 2) fail(get(r, "name"), "odd text_hex");
}

static const float *sort_p;
static int by_prob_desc(const void *a, const void *b) {
    float x = sort_p[*(const int *)a], y = sort_p[*(const int *)b];
    return (x < y) - (x > y);
}

static void check_sampling(const Record *r) {
    const char *name = get(r, "name");
    long V = geti(r, "V"), top_k = geti(r, "top_k");
    double temperature = getd(r, "temperature"), top_p = getd(r, "top_p");
    double presence = getd(r, "presence"), frequency = getd(r, "frequency");
    float *logits = need(r, "logits", 4 * V), *penalised = need(r, "penalised", 4 * V);
    double *probs = need(r, "probs", 8 * V);
    if (!logits || !penalised || !probs) goto done;
    /* the penalties: occurrence=token:count,... and ban=token,... */
    float *mine = malloc(4 * V);
    memcpy(mine, logits, 4 * V);
    long ban[256]; int nban = parse_ints(get(r, "ban"), ban, 256);
    for (int i = 0; i < nban; i++) mine[ban[i]] = -INFINITY;
    const char *s = get(r, "occurrence");
    while (s && *s) {
        long token = strtol(s, (char **)&s, 10);
        double count = strtod(s + 1, (char **)&s);
        mine[token] = (float)(mine[token] - (float)(presence + count * frequency));
        if (*s == ',') s++;
    }
    for (long i = 0; i < V; i++)
        if (!(mine[i] == penalised[i] || fabsf(mine[i] - penalised[i]) <= 1e-6f * fabsf(penalised[i])))
            { fail(name, "penalised logits differ"); break; }
    /* softmax (in double here; the reference uses float32: compared to 1e-5), top-p at
       temperature 1 (ties with the cutoff kept), top-k, then p^(1/temperature) renormalised */
    float max = -INFINITY; for (long i = 0; i < V; i++) if (penalised[i] > max) max = penalised[i];
    float *p = malloc(4 * V); double sum = 0;
    for (long i = 0; i < V; i++) sum += exp((double)penalised[i] - max);
    for (long i = 0; i < V; i++) p[i] = (float)(exp((double)penalised[i] - max) / sum);
    int *order = malloc(sizeof(int) * V);
    for (long i = 0; i < V; i++) order[i] = (int)i;
    sort_p = p; qsort(order, V, sizeof(int), by_prob_desc);
    float cutoff = 0;
    if (top_p < 1) { double c = 0; for (long i = 0; i < V; i++) { c += p[order[i]]; if (c >= top_p) { cutoff = p[order[i]]; break; } } }
    double *q = calloc(V, sizeof(double)); double total = 0;
    for (long i = 0; i < V; i++) {
        int rank = 0; while (order[rank] != i) rank++;
        int kept = p[i] >= cutoff && p[i] > 0 && (top_k <= 0 || top_k >= V || rank < top_k);
        q[i] = kept ? pow(p[i], 1.0 / temperature) : 0; total += q[i];
    }
    long allowed[65536]; int nallowed = parse_ints(get(r, "allowed"), allowed, 65536);
    if (nallowed != geti(r, "n_allowed")) fail(name, "allowed count is not n_allowed");
    int j = 0; double psum = 0;
    for (long i = 0; i < V; i++) {
        psum += probs[i];
        if ((probs[i] > 0) != (j < nallowed && allowed[j] == i)) { fail(name, "allowed set differs from probs > 0"); break; }
        if (probs[i] > 0) j++;
        if (fabs(q[i] / total - probs[i]) > 1e-5) { fail(name, "probabilities differ from the recomputation"); break; }
    }
    if (fabs(psum - 1) > 1e-12) fail(name, "probs do not sum to 1");
    free(mine); free(p); free(order); free(q);
done:
    free(logits); free(penalised); free(probs);
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s GOLDEN_DIR\n", argv[0]); return 2; }
    snprintf(dir, sizeof dir, "%s", argv[1]);
    char path[8192]; snprintf(path, sizeof path, "%s/manifest.txt", dir);
    FILE *f = fopen(path, "r");
    if (!f) { fprintf(stderr, "cannot open %s\n", path); return 2; }
    static char line[1 << 20];
    int counts[3] = {0, 0, 0};
    while (fgets(line, sizeof line, f)) {
        if (line[0] == '#' || line[0] == '\n') continue;
        Record r = {0};
        for (char *tok = strtok(line, " \n"); tok && r.n < MAXF; tok = strtok(NULL, " \n")) {
            char *eq = strchr(tok, '=');
            if (!eq) continue;
            *eq = 0; r.key[r.n] = tok; r.val[r.n++] = eq + 1;
        }
        const char *kind = get(&r, "kind");
        if (!kind) continue;
        if (!strcmp(kind, "model")) { check_model(&r); counts[0]++; }
        else if (!strcmp(kind, "tokenizer")) { check_tokenizer(&r); counts[1]++; }
        else if (!strcmp(kind, "sampling")) { check_sampling(&r); counts[2]++; }
    }
    fclose(f);
    printf("%d model, %d tokenizer, %d sampling cases checked, %d failures\n",
           counts[0], counts[1], counts[2], failures);
    return failures ? 1 : 0;
}
