// Our CUDA kernels (src/cuda/*.cu, each compiled as its own C++ translation unit against
// emulator.h) run on the CPU against references in double or in the kernels' own f32 order. Run
// by tests/cuda_emulator.rs; prints one line per case, exits non-zero on the first failure.
//
// Launch geometry follows the Rust launchers (src/cuda/*.rs): threads per block, what a block
// covers, the grid's second dimension. Grid-stride kernels get a few blocks only: the emulator
// runs every thread, and a short grid exercises the stride.

#include <array>
#include <initializer_list>
#include <string>

#include "emulator.h"
#include "../../src/cuda/attention.cuh"
#include "../../src/cuda/conv_igemm.cuh"
#include "../../src/cuda/group_norm.cuh"
#include "../../src/cuda/permute.cuh"

#define ATTENTION_KERNELS(PREFIX, NAME, T)                                                                  \
    extern "C" void PREFIX##_##NAME##_d16(const T*, const T*, const T*, T*, const T*, int, int, float, AttentionLayout);   \
    extern "C" void PREFIX##_##NAME##_d32(const T*, const T*, const T*, T*, const T*, int, int, float, AttentionLayout);   \
    extern "C" void PREFIX##_##NAME##_d64(const T*, const T*, const T*, T*, const T*, int, int, float, AttentionLayout);   \
    extern "C" void PREFIX##_##NAME##_d128(const T*, const T*, const T*, T*, const T*, int, int, float, AttentionLayout);
ATTENTION_KERNELS(flash_attention, f16, __half)
ATTENTION_KERNELS(flash_attention, bf16, __nv_bfloat16)
ATTENTION_KERNELS(flash_attention_short, f16, __half)
ATTENTION_KERNELS(flash_attention_short, bf16, __nv_bfloat16)
ATTENTION_KERNELS(flash_attention2, f16, __half)
ATTENTION_KERNELS(flash_attention2, bf16, __nv_bfloat16)
#define WIDE_ATTENTION_KERNELS(NAME, T)                                                                     \
    extern "C" void flash_attention2w_##NAME##_d16(const T*, const T*, const T*, T*, const T*, int, int, float, AttentionLayout); \
    extern "C" void flash_attention2w_##NAME##_d32(const T*, const T*, const T*, T*, const T*, int, int, float, AttentionLayout); \
    extern "C" void flash_attention2w_##NAME##_d64(const T*, const T*, const T*, T*, const T*, int, int, float, AttentionLayout);
WIDE_ATTENTION_KERNELS(f16, __half)
WIDE_ATTENTION_KERNELS(bf16, __nv_bfloat16)

#define NORM_AND_EPILOGUE_KERNELS(NAME, T)                                                                  \
    extern "C" void group_stats_##NAME(const T*, double*, GroupRuns, int);                                 \
    extern "C" void group_apply_##NAME(const T*, const T*, const T*, const double*, T*, int, size_t, int,  \
                                       float, int, int);                                                    \
    extern "C" void bias_rows_##NAME(const T*, const T*, const T*, T*, size_t, int, int);                  \
    extern "C" void geglu_bias_##NAME(const T*, const T*, T*, size_t, int, int);                           \
    extern "C" void bias_channels_##NAME(const T*, const T*, const T*, T*, size_t, int, size_t, int);      \
    extern "C" void conv_bias_##NAME(const float*, const T*, T*, size_t, int, int, int, int);                \
    extern "C" void permute_bias_add_##NAME(const T*, const T*, int64_t, const T*, T*, Tiles, int64_t);         \
    extern "C" void add_layer_norm_##NAME(const T*, const T*, const T*, const T*, const T*, T*, T*, size_t, int, float, int);
#define CONV_TILE(NAME, T, BM, BN, STAGES)                                                                  \
    extern "C" void conv_igemm_##BM##x##BN##_s##STAGES##_##NAME(const T*, const T*, const T*, const T*, const T*, T*, ConvGeometry);
#define CONV_KERNELS(NAME, T)                                                                               \
    extern "C" void to_channels_last_##NAME(const T*, T*, int, int, int, int, int, int, CopyLayout, const double*, \
                                            const T*, const T*, int, float, int);                           \
    CONV_TILE(NAME, T, 128, 128, 2)                                                                         \
    CONV_TILE(NAME, T, 128, 128, 3)                                                                         \
    CONV_TILE(NAME, T, 128, 128, 4)                                                                         \
    CONV_TILE(NAME, T, 128, 256, 3)                                                                         \
    CONV_TILE(NAME, T, 64, 256, 3)
CONV_KERNELS(f16, __half)
CONV_KERNELS(bf16, __nv_bfloat16)

extern "C" void permute_blocks_b16(const uint16_t*, uint16_t*, Blocks, int64_t, int64_t);
extern "C" void permute_blocks_b16_i32(const uint16_t*, uint16_t*, Blocks, uint32_t, uint32_t);
extern "C" void permute_blocks_b128_i32(const uint4*, uint4*, Blocks, uint32_t, uint32_t);
extern "C" void permute_blocks_b32(const uint32_t*, uint32_t*, Blocks, int64_t, int64_t);
extern "C" void permute_blocks_b128(const uint4*, uint4*, Blocks, int64_t, int64_t);
extern "C" void permute_tiles_b16(const uint16_t*, uint16_t*, Tiles, int64_t);
extern "C" void permute_tiles_b32(const uint32_t*, uint32_t*, Tiles, int64_t);

NORM_AND_EPILOGUE_KERNELS(f32, float)
NORM_AND_EPILOGUE_KERNELS(f16, __half)
NORM_AND_EPILOGUE_KERNELS(bf16, __nv_bfloat16)

namespace {

std::mt19937_64 rng{42};
int failures = 0;

// A device buffer: `len` elements between guard bands of NaN bit patterns, 128-byte aligned.
template <typename T>
struct Buffer {
    static constexpr size_t GUARD = 128 / sizeof(T);
    std::vector<T> storage;
    size_t len;
    explicit Buffer(size_t n) : storage(n + 2 * GUARD), len(n) {
        std::memset(static_cast<void*>(storage.data()), 0xff, storage.size() * sizeof(T));
    }
    T* data() { return storage.data() + GUARD; }
    T& operator[](size_t i) { return storage[GUARD + i]; }
    bool guards_intact() const {
        const auto* bytes = reinterpret_cast<const unsigned char*>(storage.data());
        const size_t guard_bytes = GUARD * sizeof(T), end = (GUARD + len) * sizeof(T);
        for (size_t i = 0; i < guard_bytes; ++i)
            if (bytes[i] != 0xff || bytes[end + i] != 0xff) return false;
        return true;
    }
};

template <typename T>
Buffer<T> random_buffer(size_t n, float mean = 0.f, float std = 1.f) {
    std::normal_distribution<float> normal(mean, std);
    Buffer<T> b(n);
    for (size_t i = 0; i < n; ++i) b[i] = T(normal(rng));
    return b;
}

void report(const std::string& name, bool ok, const std::string& detail) {
    std::printf("%s %s: %s\n", ok ? "ok  " : "FAIL", name.c_str(), detail.c_str());
    if (!ok) ++failures;
}

// A kernel's output against the reference: the relative (L2) error, element by element.
struct RelativeError {
    double err = 0, norm = 0;
    void add(double got, double want) {
        err += (got - want) * (got - want);
        norm += want * want;
    }
};

// A buffer's guard check for report_relative: whether it is intact, and what the buffer is.
struct Guard {
    bool intact;
    const char* buffer;
};

// Reports a case compared by relative error (`what` describes it): ok when the error is finite and
// under `tolerance` and every guard is intact.
void report_relative(const std::string& name, const std::string& what, const RelativeError& e, double tolerance,
                     std::initializer_list<Guard> guards) {
    const double rel = std::sqrt(e.err / e.norm);
    char error[64];
    std::snprintf(error, sizeof error, " relative error %.2e (bound %.0e)", rel, tolerance);
    std::string detail = what + error;
    bool ok = std::isfinite(rel) && rel < tolerance;
    for (const Guard& g : guards) {
        if (!g.intact) detail += std::string(", wrote outside ") + g.buffer;
        ok = ok && g.intact;
    }
    report(name, ok, detail);
}

template <typename T>
const char* dtype_name() {
    if constexpr (std::is_same_v<T, float>) return "f32";
    if constexpr (std::is_same_v<T, __half>) return "f16";
    return "bf16";
}

template <typename T>
bool same_bits(T a, T b) {
    return std::memcmp(&a, &b, sizeof(T)) == 0;
}

// ---- attention

using AttentionKernel = void (*)(const void*, const void*, const void*, void*, const void*, int, int, float, AttentionLayout);

struct AttentionKernels {
    const char* name;
    int block_queries;  // queries per block (the Rust launcher's BLOCK_QUERIES)
    int threads;
    AttentionKernel f16[4], bf16[4];  // d = 16, 32, 64, 128; null where the set has no such kernel
    int max_queries = 0;               // flash_attention_short: at most 16 queries, a warp per (batch, head)
};

// How q, k and v are laid out (the output is always (b, n, heads·d), heads side by side):
// separate tensors (b, len, heads·d), or self-attention on one fused projection (b, n, 3·heads·d)
// holding q, k, v in that order along its last dimension; Addend: separate, the output added to
// an addend (the dual cross-attention's second branch) with a weight.
enum class Packing { Separate, FusedQkv, Addend };

template <typename T>
void attention_case(const AttentionKernels& kernels, Packing packing, int b, int heads, int n, int m, int d, double tolerance) {
    const int di = d == 16 ? 0 : d == 32 ? 1 : d == 64 ? 2 : 3;
    const AttentionKernel kernel = std::is_same_v<T, __half> ? kernels.f16[di] : kernels.bf16[di];
    if (!kernel || (kernels.max_queries && n > kernels.max_queries)) return;  // the launcher never picks this set for d or n
    const float scale = 1.f / std::sqrt(static_cast<float>(d));
    const int64_t c = (int64_t)heads * d;
    const bool fused = packing == Packing::FusedQkv, adding = packing == Packing::Addend;
    if (fused) m = n;
    const float weight = adding ? 0.75f : 1.f;
    Buffer<T> addend = random_buffer<T>(adding ? (size_t)b * n * c : 0);
    // Separate: three buffers; fused: q's buffer holds all three.
    Buffer<T> q = random_buffer<T>((size_t)b * n * (fused ? 3 * c : c)), k = random_buffer<T>(fused ? 0 : (size_t)b * m * c),
              v = random_buffer<T>(fused ? 0 : (size_t)b * m * c), out((size_t)b * n * c);
    const T* qp = q.data();
    const T* kp = fused ? q.data() + c : k.data();
    const T* vp = fused ? q.data() + 2 * c : v.data();
    const int64_t qkv_row = fused ? 3 * c : c;
    AttentionLayout layout{n * qkv_row, m * qkv_row, m * qkv_row, n * c, qkv_row, qkv_row, qkv_row, c, heads, weight, b};
    // Query blocks per (batch, head), or (flash_attention_short) one warp per (batch, head).
    const unsigned blocks = kernels.max_queries ? (b * heads + kernels.threads / 32 - 1) / (kernels.threads / 32)
                                                : b * heads * ((n + kernels.block_queries - 1) / kernels.block_queries);
    emu::launch(dim3{blocks, 1, 1}, dim3{(unsigned)kernels.threads, 1, 1},
                [&] { kernel(qp, kp, vp, out.data(), adding ? addend.data() : nullptr, n, m, scale, layout); });
    RelativeError error;
    std::vector<double> p(m);
    for (int bi = 0; bi < b; ++bi)
        for (int h = 0; h < heads; ++h)
            for (int i = 0; i < n; ++i) {
                const T* qi = qp + bi * layout.q_batch + i * layout.q_row + h * d;
                double top = -INFINITY;
                for (int j = 0; j < m; ++j) {
                    const T* kj = kp + bi * layout.k_batch + j * layout.k_row + h * d;
                    double s = 0;
                    for (int e = 0; e < d; ++e) s += double(float(qi[e])) * float(kj[e]);
                    p[j] = s * scale;
                    top = std::max(top, p[j]);
                }
                double sum = 0;
                for (int j = 0; j < m; ++j) sum += (p[j] = std::exp(p[j] - top));
                for (int e = 0; e < d; ++e) {
                    double want = 0;
                    for (int j = 0; j < m; ++j) want += p[j] * float(vp[bi * layout.v_batch + j * layout.v_row + h * d + e]);
                    const int64_t o = bi * layout.out_batch + i * layout.out_row + h * d + e;
                    want = want / sum * weight + (adding ? double(float(addend[o])) : 0.0);
                    error.add(float(out[o]), want);
                }
            }
    char what[160];
    std::snprintf(what, sizeof what, "%s b=%d heads=%d n=%d m=%d d=%d", fused ? "fused qkv" : adding ? "addend" : "separate", b,
                  heads, n, m, d);
    report_relative(std::string(kernels.name) + " " + dtype_name<T>(), what, error, tolerance, {{out.guards_intact(), "its output"}});
}

void attention(const AttentionKernels& kernels) {
    // Lengths on and off the tiles, cross- and self-attention, every head dimension; one head
    // (contiguous rows of d) and several side by side.
    const int cases[][5] = {{1, 1, 1, 1, 64},    {3, 1, 17, 77, 64},  {2, 1, 64, 16, 64},  {1, 1, 130, 200, 64},
                            {1, 1, 256, 256, 64}, {1, 1, 300, 520, 64}, {4, 1, 70, 130, 16}, {3, 1, 65, 64, 32},
                            {2, 1, 200, 90, 128}, {5, 1, 16, 16, 64},  {2, 5, 150, 77, 64}, {3, 2, 40, 33, 32}};
    for (const auto& c : cases) {
        attention_case<__nv_bfloat16>(kernels, Packing::Separate, c[0], c[1], c[2], c[3], c[4], 5e-3);
        attention_case<__half>(kernels, Packing::Separate, c[0], c[1], c[2], c[3], c[4], 1e-3);
    }
    // The dual cross-attention's image branch joining the text branch's output.
    for (const auto& c : {std::array<int, 5>{2, 5, 150, 16, 64}, std::array<int, 5>{1, 2, 40, 33, 32}, std::array<int, 5>{3, 2, 12, 20, 32}}) {
        attention_case<__nv_bfloat16>(kernels, Packing::Addend, c[0], c[1], c[2], c[3], c[4], 5e-3);
        attention_case<__half>(kernels, Packing::Addend, c[0], c[1], c[2], c[3], c[4], 1e-3);
    }
    // Short runs of queries (the temporal attention, tiny models' few frames) against more keys
    // than one 16-key tile, and batches·heads that do not fill a block's warps.
    for (const auto& c : {std::array<int, 5>{3, 2, 5, 40, 64}, std::array<int, 5>{1, 3, 16, 33, 128}, std::array<int, 5>{7, 1, 2, 2, 16}}) {
        attention_case<__nv_bfloat16>(kernels, Packing::Separate, c[0], c[1], c[2], c[3], c[4], 5e-3);
        attention_case<__half>(kernels, Packing::Separate, c[0], c[1], c[2], c[3], c[4], 1e-3);
    }
    // Self-attention on a fused projection: spatial (long) and temporal (16 frames) shapes.
    const int fused[][4] = {{1, 5, 160, 64}, {6, 5, 16, 64}, {2, 3, 20, 16}, {1, 2, 130, 128}};
    for (const auto& c : fused) {
        attention_case<__nv_bfloat16>(kernels, Packing::FusedQkv, c[0], c[1], c[2], c[2], c[3], 5e-3);
        attention_case<__half>(kernels, Packing::FusedQkv, c[0], c[1], c[2], c[2], c[3], 1e-3);
    }
}

// ---- group norm (src/cuda/mod.rs: 256 threads, statistics blocks of 256·16 elements)

template <typename T>
using GroupStats = void (*)(const T*, double*, GroupRuns, int);
template <typename T>
using GroupApply = void (*)(const T*, const T*, const T*, const double*, T*, int, size_t, int, float, int, int);

// Both passes on the launcher's grid (chunks of 4096 elements, n·groups); 16-byte packs where the
// plane is whole packs, as the launcher decides, and without them.
template <typename T>
void group_norm_case(GroupStats<T> stats, GroupApply<T> apply, int n, int c, int groups, size_t s, int silu, int packed,
                     double tolerance) {
    constexpr unsigned THREADS = 256, CHUNK = THREADS * 16;
    const size_t total = (size_t)n * c * s, cpg = c / groups, group_len = cpg * s;
    Buffer<T> x = random_buffer<T>(total, 40.f, 3.f), w = random_buffer<T>(c), b = random_buffer<T>(c), y(total);
    std::vector<double> sums(2 * n * groups, 0.0);
    const float eps = 1e-6f;
    const dim3 grid{(unsigned)((group_len + CHUNK - 1) / CHUNK), (unsigned)(n * groups), 1};
    const GroupRuns runs{(int64_t)group_len, (int64_t)(c * s), (int64_t)group_len, 0, 1, groups};
    emu::launch(grid, dim3{THREADS, 1, 1}, [&] { stats(x.data(), sums.data(), runs, packed); });
    emu::launch(grid, dim3{THREADS, 1, 1},
                [&] { apply(x.data(), w.data(), b.data(), sums.data(), y.data(), c, s, (int)cpg, eps, silu, packed); });
    RelativeError error;
    for (size_t g = 0; g < (size_t)n * groups; ++g) {
        double mean = 0, var = 0;
        for (size_t i = 0; i < group_len; ++i) mean += float(x[g * group_len + i]);
        mean /= group_len;
        for (size_t i = 0; i < group_len; ++i) var += std::pow(float(x[g * group_len + i]) - mean, 2);
        var /= group_len;
        for (size_t i = 0; i < group_len; ++i) {
            const size_t e = g * group_len + i;
            const int ch = (e / s) % c;
            double want = (float(x[e]) - mean) / std::sqrt(var + eps) * float(w[ch]) + float(b[ch]);
            if (silu) want = want / (1 + std::exp(-want));
            error.add(float(y[e]), want);
        }
    }
    char what[120];
    std::snprintf(what, sizeof what, "n=%d c=%d groups=%d s=%zu silu=%d packed=%d", n, c, groups, s, silu, packed);
    report_relative(std::string("group norm ") + dtype_name<T>(), what, error, tolerance, {{y.guards_intact(), "its output"}});
}

template <typename T>
void group_norm(GroupStats<T> stats, GroupApply<T> apply, double tolerance) {
    constexpr size_t V = 16 / sizeof(T);
    // (n, c, groups, s, silu): a plane that is whole packs or not; groups of one and of several
    // statistics blocks; a group's channels straddling blocks.
    const size_t cases[][5] = {{2, 32, 8, 300, 0}, {1, 16, 4, 2500, 1}, {1, 16, 4, 2560, 1}, {2, 64, 32, 2048, 1}, {3, 40, 8, 72, 0}};
    for (const auto& k : cases) {
        for (int packed : {0, 1}) {
            if (packed && k[3] % V != 0) continue;
            group_norm_case<T>(stats, apply, (int)k[0], (int)k[1], (int)k[2], k[3], (int)k[4], packed, tolerance);
        }
    }
}

// ---- epilogues (src/cuda/epilogue.rs: 256 threads, grid-stride). Exact: the kernels' f32 order.

template <typename T>
float f(T v) {
    return float(v);
}

float gelu(float g) { return 0.5f * g * (1.f + erff(g * 0.70710678118654752f)); }

template <typename T, typename Want>
void expect_exact(const std::string& name, Buffer<T>& out, size_t len, Want want) {
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < len; ++i)
        if (!same_bits(out[i], T(want(i))) && bad++ == 0) first = i;
    char detail[160];
    std::snprintf(detail, sizeof detail, "%zu of %zu elements differ (first at %zu)%s", bad, len, first,
                  out.guards_intact() ? "" : ", wrote outside its output");
    report(name + " " + dtype_name<T>(), bad == 0 && out.guards_intact(), detail);
}

template <typename T>
void epilogues(void (*bias_rows)(const T*, const T*, const T*, T*, size_t, int, int),
               void (*geglu)(const T*, const T*, T*, size_t, int, int),
               void (*bias_channels)(const T*, const T*, const T*, T*, size_t, int, size_t, int),
               void (*conv_bias)(const float*, const T*, T*, size_t, int, int, int, int)) {
    constexpr int V = 16 / sizeof(T);
    const dim3 grid{3, 1, 1}, block{256, 1, 1};
    for (int packed : {1, 0}) {
        const int cols = packed ? 8 * V : 8 * V + 3;
        const size_t rows = 37, total = rows * cols;
        for (bool residual : {true, false}) {
            Buffer<T> y = random_buffer<T>(total), bias = random_buffer<T>(cols), r = random_buffer<T>(total), out(total);
            const T* rp = residual ? r.data() : nullptr;
            emu::launch(grid, block, [&] { bias_rows(y.data(), bias.data(), rp, out.data(), total, cols, packed); });
            expect_exact(std::string("bias_rows packed=") + std::to_string(packed) + " residual=" + std::to_string(residual),
                         out, total, [&](size_t i) {
                             float v = f(y[i]) + f(bias[i % cols]);
                             if (residual) v += f(r[i]);
                             return v;
                         });
            const size_t channels = 5, plane = packed ? 4 * V : 4 * V + 1, n = 3, all = n * channels * plane;
            Buffer<T> yc = random_buffer<T>(all), bc = random_buffer<T>(channels), rc = random_buffer<T>(all), oc(all);
            const T* rcp = residual ? rc.data() : nullptr;
            emu::launch(grid, block, [&] {
                bias_channels(yc.data(), bc.data(), rcp, oc.data(), all, (int)channels, plane, packed);
            });
            expect_exact(std::string("bias_channels packed=") + std::to_string(packed) + " residual=" +
                             std::to_string(residual),
                         oc, all, [&](size_t i) {
                             float v = f(yc[i]) + f(bc[(i / plane) % channels]);
                             if (residual) v += f(rc[i]);
                             return v;
                         });
        }
        const int d = cols;
        Buffer<T> p = random_buffer<T>(rows * 2 * d), gb = random_buffer<T>(2 * d), go(rows * d);
        emu::launch(grid, block, [&] { geglu(p.data(), gb.data(), go.data(), rows, d, packed); });
        expect_exact(std::string("geglu_bias packed=") + std::to_string(packed), go, rows * d, [&](size_t i) {
            const size_t r = i / d, j = i % d;
            return (f(p[r * 2 * d + j]) + f(gb[j])) * gelu(f(p[r * 2 * d + d + j]) + f(gb[d + j]));
        });
    }
    // conv_bias: (planes, rows, pitch) f32 → (planes, rows, width), a bias per channel.
    const int channels = 4, planes = 2 * channels, rows = 6, pitch = 13, width = 10;
    const size_t total = (size_t)planes * rows * width;
    Buffer<float> y = random_buffer<float>((size_t)planes * rows * pitch);
    Buffer<T> bias = random_buffer<T>(channels), out(total);
    emu::launch(grid, block, [&] { conv_bias(y.data(), bias.data(), out.data(), total, channels, rows, pitch, width); });
    expect_exact("conv_bias", out, total, [&](size_t i) {
        const size_t pl = i / (rows * width), r = (i % (rows * width)) / width, x = i % width;
        return y[(pl * rows + r) * pitch + x] + f(bias[pl % channels]);
    });
}

// add_layer_norm: the sum exactly as bias_rows makes it; the norm of the rounded sum against a
// double reference (the kernel's totals run in another order).
template <typename T>
void add_layer_norms(void (*kernel)(const T*, const T*, const T*, const T*, const T*, T*, T*, size_t, int, float, int),
                     double tolerance) {
    constexpr int V = 16 / sizeof(T);
    const size_t rows = 37;
    const float eps = 1e-5f;
    for (int packed : {1, 0}) {
        const int cols = packed ? 40 * V : 40 * V + 3;
        const size_t total = rows * cols;
        for (bool residual : {true, false}) {
            Buffer<T> y = random_buffer<T>(total, 0.5f, 2.f), bias = random_buffer<T>(cols), r = random_buffer<T>(total),
                      gamma = random_buffer<T>(cols, 1.f, 0.2f), beta = random_buffer<T>(cols), sum(total), normed(total);
            emu::launch(dim3{3, 1, 1}, dim3{256, 1, 1}, [&] {
                kernel(y.data(), bias.data(), residual ? r.data() : nullptr, gamma.data(), beta.data(), sum.data(),
                       normed.data(), rows, cols, eps, packed);
            });
            const std::string name = std::string("add_layer_norm packed=") + std::to_string(packed) +
                                     " residual=" + std::to_string(residual);
            expect_exact(name + " sum", sum, total, [&](size_t i) {
                float v = f(y[i]) + f(bias[i % cols]);
                if (residual) v += f(r[i]);
                return v;
            });
            RelativeError error;
            for (size_t row = 0; row < rows; ++row) {
                double mean = 0, var = 0;
                for (int c = 0; c < cols; ++c) mean += f(sum[row * cols + c]);
                mean /= cols;
                for (int c = 0; c < cols; ++c) var += std::pow(f(sum[row * cols + c]) - mean, 2);
                var /= cols;
                for (int c = 0; c < cols; ++c) {
                    const double want = (f(sum[row * cols + c]) - mean) / std::sqrt(var + eps) * f(gamma[c]) + f(beta[c]);
                    error.add(f(normed[row * cols + c]), want);
                }
            }
            report_relative(name + " norm " + dtype_name<T>(), "norm", error, tolerance, {{normed.guards_intact(), "its output"}});
        }
    }
}

// permute_bias_add: y (b, p, t, c) → out (b, t, c, p) = y + bias[c] + addend, the transformers'
// exits (spatial: t = 1); Tiles as permute.rs's plan gives them (t and c merged), and for the
// temporal one also with t and c as separate axes.
template <typename T>
void permute_bias_adds(void (*kernel)(const T*, const T*, int64_t, const T*, T*, Tiles, int64_t)) {
    struct Case {
        const char* name;
        int64_t b, p, t, c;
        Tiles tiles;
        dim3 grid;
    };
    const Case cases[] = {
        {"spatial (n, hw, c) -> (n, c, hw)", 3, 70, 1, 40, Tiles{40, 70, 40, 70, 1, {3}, {2800}, {2800}}, dim3{2, 3, 2}},
        {"temporal (b, hw, t·c) -> (b, t·c, hw)", 2, 9, 5, 36, Tiles{180, 9, 180, 9, 1, {2}, {1620}, {1620}}, dim3{6, 1, 1}},
        {"temporal (b, hw, t, c) -> (b, t, c, hw)", 2, 9, 5, 36, Tiles{36, 9, 180, 9, 2, {2, 5}, {1620, 36}, {1620, 324}},
         dim3{2, 1, 4}},
    };
    for (const Case& k : cases) {
        for (bool with_bias : {true, false}) {
            const size_t total = k.b * k.p * k.t * k.c;
            Buffer<T> y = random_buffer<T>(total), bias = random_buffer<T>(k.c), add = random_buffer<T>(total), out(total);
            int64_t batches = 1;
            for (int d = 0; d < k.tiles.batch_rank; ++d) batches *= k.tiles.batch_dims[d];
            emu::launch(k.grid, dim3{32, 8, 1},
                        [&] { kernel(y.data(), with_bias ? bias.data() : nullptr, k.c, add.data(), out.data(), k.tiles, batches); });
            expect_exact(std::string("permute_bias_add ") + k.name + (with_bias ? "" : " without bias"), out, total, [&](size_t o) {
                const size_t pi = o % k.p, ci = o / k.p % k.c, ti = o / (k.p * k.c) % k.t, bi = o / (k.p * k.c * k.t);
                float v = f(y[((bi * k.p + pi) * k.t + ti) * k.c + ci]);
                if (with_bias) v += f(bias[ci]);
                return v + f(add[o]);
            });
        }
    }
}

// ---- implicit-GEMM convolutions (src/cuda/mod.rs: the channels-last copy in 32×32 tiles of
// (32, 8) threads, then 128 channels × 128 positions per block of 256 threads)

// (xp, w, bias, sample_bias, residual, out, geometry)
template <typename T>
using ConvKernel = void (*)(const T*, const T*, const T*, const T*, const T*, T*, ConvGeometry);

template <typename T>
using ToChannelsLast = void (*)(const T*, T*, int, int, int, int, int, int, CopyLayout, const double*, const T*, const T*, int,
                                float, int);

// What runs before a convolution: its channels-last copy, and the group norm's statistics pass
// for a copy that normalises (group_norm.cu's, as the launcher runs it).
template <typename T>
struct ConvInput {
    ToChannelsLast<T> to_channels_last;
    GroupStats<T> group_stats;
};

// One of conv_igemm.cu's tile shapes and pipeline depths (conv_igemm.rs's `Tile`).
template <typename T>
struct ConvTile {
    const char* name;
    ConvKernel<T> kernel;
    int channels, positions;  // per block
};

// The group norm's reference over an input read at x_at(sample, channel, row, col): per (sample,
// group) its mean and 1/σ in double, then visit(sample, channel, row, col, element, mean, rstd)
// for each of the group's elements.
template <typename T, typename At, typename Visit>
void each_normalised(Buffer<T>& x, int n, int groups, int cpg, int rows, int cols, double eps, At x_at, Visit visit) {
    for (int s = 0; s < n; ++s)
        for (int g = 0; g < groups; ++g) {
            auto each = [&](auto f) {
                for (int ch = g * cpg; ch < (g + 1) * cpg; ++ch)
                    for (int r = 0; r < rows; ++r)
                        for (int col = 0; col < cols; ++col) f(ch, r, col, (size_t)x_at(s, ch, r, col));
            };
            double sum = 0, sq = 0;
            each([&](int, int, int, size_t e) { sum += float(x[e]); });
            const double count = (double)cpg * rows * cols, mean = sum / count;
            each([&](int, int, int, size_t e) { sq += (float(x[e]) - mean) * (float(x[e]) - mean); });
            const double rstd = 1.0 / std::sqrt(sq / count + eps);
            each([&](int ch, int r, int col, size_t e) { visit(s, ch, r, col, e, mean, rstd); });
        }
}

// A 3×3 convolution (padding 1) when `spatial`, else the temporal (3, 1, 1) one (padding 1 in
// rows), of an input of in_rows × in_cols: upsampled 2× (nearest) in the channels-last copy when
// `up` is 2, read at every `stride`-th position (2: the downsampling convolutions), with a bias
// per sample and channel and a residual added when `extras`. With `frames` the input, residual and
// output are frames (n·rows, c, cols), read and written as (n, c, rows, cols) (a temporal
// convolution in the frames layout around it).
template <typename T>
void conv_case(const ConvInput<T>& input, const ConvTile<T>& tile, bool spatial, bool extras, int n, int ci, int co,
               int in_rows, int in_cols, double tolerance, int up = 1, int stride = 1, int groups = 0, bool silu = false,
               bool frames = false) {
    const int pad_r = 1, pad_c = spatial ? 1 : 0, kh = 3, kw = spatial ? 3 : 1, taps = kh * kw;
    const int rows_p = in_rows * up + 2 * pad_r, cols_p = in_cols * up + 2 * pad_c, plane_p = rows_p * cols_p;
    const int rows = (rows_p - kh) / stride + 1, cols = (cols_p - kw) / stride + 1;
    const size_t positions = (size_t)rows * cols;
    Buffer<T> x = random_buffer<T>((size_t)n * ci * in_rows * in_cols), w = random_buffer<T>((size_t)taps * co * ci, 0.f, 0.1f),
              bias = random_buffer<T>(co), xp((size_t)n * plane_p * ci), out((size_t)n * co * positions),
              sample_bias = random_buffer<T>((size_t)n * co), residual = random_buffer<T>((size_t)n * co * positions);
    // Element (sample, channel, row, col) of the input and of the output (and residual).
    const int64_t out_plane = (int64_t)plane_p * ci;
    const CopyLayout at = frames ? CopyLayout{(int64_t)in_rows * ci * in_cols, in_cols, (int64_t)ci * in_cols, out_plane, (int64_t)cols_p * ci, ci}
                                 : CopyLayout{(int64_t)ci * in_rows * in_cols, (int64_t)in_rows * in_cols, in_cols, out_plane, (int64_t)cols_p * ci, ci};
    auto x_at = [&](int s, int ch, int r, int c) { return s * at.in_sample + ch * at.in_channel + r * at.in_row + c; };
    auto out_at = [&](int s, int o, int r, int c) {
        return frames ? (((size_t)s * rows + r) * co + o) * cols + c : (((size_t)s * co + o) * rows + r) * cols + c;
    };
    // With `groups`: x group-normalised (+ SiLU) in the copy, from group_stats's sums (frames: one
    // run of a group per frame).
    const int cpg = groups ? ci / groups : 1;
    const size_t plane = (size_t)in_rows * in_cols, group_len = (size_t)cpg * plane;
    std::vector<double> sums(2 * (size_t)n * (groups ? groups : 1), 0.0);
    Buffer<T> gamma = random_buffer<T>(ci, 1.f, 0.2f), beta = random_buffer<T>(ci, 0.f, 0.2f);
    if (groups) {
        const GroupRuns runs = frames ? GroupRuns{(int64_t)cpg * in_cols, at.in_sample, (int64_t)cpg * in_cols, at.in_row, in_rows, groups}
                                      : GroupRuns{(int64_t)group_len, at.in_sample, (int64_t)group_len, 0, 1, groups};
        const int packed = (frames ? in_cols : plane) % (16 / sizeof(T)) == 0;
        emu::launch(dim3{(unsigned)((runs.run_len + 4095) / 4096), (unsigned)(n * groups * runs.runs), 1}, dim3{256, 1, 1},
                    [&] { input.group_stats(x.data(), sums.data(), runs, packed); });
    }
    const float eps = 1e-5f;
    emu::launch(dim3{(unsigned)((cols_p + 31) / 32), (unsigned)((ci + 31) / 32), (unsigned)(n * rows_p)}, dim3{32, 8, 1}, [&] {
        input.to_channels_last(x.data(), xp.data(), ci, in_rows, in_cols, pad_r, pad_c, up, at, groups ? sums.data() : nullptr,
                               gamma.data(), beta.data(), cpg, eps, silu);
    });
    // What the products read: x, or x normalised (statistics in double, from x itself) and
    // rounded to T as the copy rounds it.
    std::vector<float> input_value(x.len);
    for (size_t e = 0; e < x.len; ++e) input_value[e] = float(x[e]);
    if (groups) {
        each_normalised(x, n, groups, cpg, in_rows, in_cols, eps, x_at, [&](int, int ch, int, int, size_t e, double mean, double rstd) {
            float y = (float(x[e]) - float(mean)) * float(rstd) * float(gamma[ch]) + float(beta[ch]);
            if (silu) y = y / (1.f + std::exp(-y));
            input_value[e] = float(T(y));
        });
    }
    const ConvGeometry g = frames ? ConvGeometry{(int64_t)rows * co * cols, cols, (int64_t)co * cols, ci, co, n, rows, cols, plane_p,
                                                 cols_p, taps, kw, cols_p, stride}
                                  : ConvGeometry{(int64_t)co * rows * cols, (int64_t)rows * cols, cols, ci, co, n, rows, cols,
                                                 plane_p, cols_p, taps, kw, cols_p, stride};
    // The launcher's grid: channel tiles fastest, then tiles of positions across samples.
    const unsigned co_tiles = (co + tile.channels - 1) / tile.channels, position_tiles = (unsigned)((n * positions + tile.positions - 1) / tile.positions);
    emu::launch(dim3{co_tiles * position_tiles, 1, 1}, dim3{256, 1, 1}, [&] {
        tile.kernel(xp.data(), w.data(), bias.data(), extras ? sample_bias.data() : nullptr, extras ? residual.data() : nullptr,
                    out.data(), g);
    });
    RelativeError error;
    for (int s = 0; s < n; ++s)
        for (int o = 0; o < co; ++o)
            for (int r = 0; r < rows; ++r)
                for (int c = 0; c < cols; ++c) {
                    double want = float(bias[o]);
                    if (extras) {
                        want += float(sample_bias[(size_t)s * co + o]);
                        want += float(residual[out_at(s, o, r, c)]);
                    }
                    for (int t = 0; t < taps; ++t) {
                        // In the (upsampled) input, before padding.
                        const int rr = r * stride + t / kw - pad_r, cc = c * stride + t % kw - pad_c;
                        if (rr < 0 || rr >= in_rows * up || cc < 0 || cc >= in_cols * up) continue;
                        for (int i = 0; i < ci; ++i)
                            want += double(float(w[((size_t)t * co + o) * ci + i])) * input_value[x_at(s, i, rr / up, cc / up)];
                    }
                    error.add(float(out[out_at(s, o, r, c)]), want);
                }
    char what[200];
    std::snprintf(what, sizeof what, "%s %s%s%s%s%s%s n=%d ci=%d co=%d %dx%d", tile.name, spatial ? "3x3" : "temporal",
                  frames ? " in frames" : "", up == 2 ? " of the 2x upsampled input" : "", stride == 2 ? " stride 2" : "",
                  groups ? (silu ? " of group norm + SiLU" : " of group norm") : "", extras ? " + sample bias + residual" : "", n,
                  ci, co, rows, cols);
    report_relative(std::string("conv_igemm ") + dtype_name<T>(), what, error, tolerance,
                    {{xp.guards_intact(), "the channels-last copy"}, {out.guards_intact(), "its output"}});
}

// The copy without a convolution: x group-normalised (no SiLU) into tokens, a transformer's entry.
// Spatial: x (n, c, rows, cols) → (n, rows·cols, c). Across frames: frames x (n·rows, c, cols),
// normalised as the video, → (n, cols, rows, c) (a temporal transformer's (b·h·w, t, c)).
template <typename T>
void tokens_case(const ConvInput<T>& input, bool across_frames, int n, int c, int groups, int rows, int cols, double tolerance) {
    const size_t total = (size_t)n * c * rows * cols;
    Buffer<T> x = random_buffer<T>(total, 3.f, 2.f), out(total);
    Buffer<T> gamma = random_buffer<T>(c, 1.f, 0.2f), beta = random_buffer<T>(c, 0.f, 0.2f);
    const int cpg = c / groups;
    const int64_t plane = (int64_t)rows * cols;
    const CopyLayout at = across_frames ? CopyLayout{plane * c, cols, (int64_t)c * cols, plane * c, c, (int64_t)rows * c}
                                        : CopyLayout{plane * c, plane, cols, plane * c, (int64_t)cols * c, c};
    auto x_at = [&](int s, int ch, int r, int col) { return s * at.in_sample + ch * at.in_channel + r * at.in_row + col; };
    const GroupRuns runs = across_frames ? GroupRuns{(int64_t)cpg * cols, at.in_sample, (int64_t)cpg * cols, at.in_row, rows, groups}
                                         : GroupRuns{cpg * plane, at.in_sample, cpg * plane, 0, 1, groups};
    std::vector<double> sums(2 * (size_t)n * groups, 0.0);
    const int packed = (across_frames ? cols : plane) % (16 / sizeof(T)) == 0;
    emu::launch(dim3{(unsigned)((runs.run_len + 4095) / 4096), (unsigned)(n * groups * runs.runs), 1}, dim3{256, 1, 1},
                [&] { input.group_stats(x.data(), sums.data(), runs, packed); });
    const float eps = 1e-6f;
    emu::launch(dim3{(unsigned)((cols + 31) / 32), (unsigned)((c + 31) / 32), (unsigned)(n * rows)}, dim3{32, 8, 1}, [&] {
        input.to_channels_last(x.data(), out.data(), c, rows, cols, 0, 0, 1, at, sums.data(), gamma.data(), beta.data(), cpg, eps, 0);
    });
    RelativeError error;
    each_normalised(x, n, groups, cpg, rows, cols, eps, x_at, [&](int s, int ch, int r, int col, size_t e, double mean, double rstd) {
        const double want = (float(x[e]) - mean) * rstd * float(gamma[ch]) + float(beta[ch]);
        const size_t o = across_frames ? (((size_t)s * cols + col) * rows + r) * c + ch : (((size_t)s * rows + r) * cols + col) * c + ch;
        error.add(float(out[o]), want);
    });
    char what[120];
    std::snprintf(what, sizeof what, "group norm into tokens%s n=%d c=%d groups=%d %dx%d", across_frames ? " across frames" : "", n,
                  c, groups, rows, cols);
    report_relative(std::string("channels-last copy ") + dtype_name<T>(), what, error, tolerance, {{out.guards_intact(), "its output"}});
}

template <typename T>
void convolutions(const ConvInput<T>& input, const std::vector<ConvTile<T>>& tiles, double tolerance) {
    // A transformer's entry: spatial, and across frames (frames of whole packs and not, more
    // channels than a block's 32, frames past a block's 32 columns).
    tokens_case<T>(input, false, 2, 64, 32, 5, 9, tolerance);
    tokens_case<T>(input, true, 2, 64, 32, 5, 24, tolerance);
    tokens_case<T>(input, true, 3, 96, 32, 16, 37, tolerance);
    tokens_case<T>(input, true, 1, 32, 8, 3, 40, tolerance);
    for (const ConvTile<T>& tile : tiles) {
        // Partial tiles in both GEMM dimensions, several of each, rows of the image and samples
        // across a tile, an odd number of positions per sample (no paired stores).
        conv_case<T>(input, tile, true, false, 2, 64, 48, 5, 7, tolerance);
        conv_case<T>(input, tile, true, true, 1, 32, 160, 12, 20, tolerance);
        conv_case<T>(input, tile, false, true, 2, 32, 40, 5, 30, tolerance);
        conv_case<T>(input, tile, false, false, 1, 96, 130, 4, 70, tolerance);
        // The UNet's deepest level: 4×4 positions per frame, many frames in one tile.
        conv_case<T>(input, tile, true, true, 9, 32, 40, 4, 4, tolerance);
        conv_case<T>(input, tile, true, true, 9, 32, 40, 3, 3, tolerance);
        conv_case<T>(input, tile, true, false, 2, 32, 40, 5, 7, tolerance, 2);
        // Downsampling, even and odd input sides.
        conv_case<T>(input, tile, true, false, 2, 32, 40, 10, 14, tolerance, 1, 2);
        conv_case<T>(input, tile, true, false, 3, 64, 24, 9, 7, tolerance, 1, 2);
        // Channels an odd multiple of 64 (the first level's 320): 1.5 tiles of 128, 3 of 64.
        conv_case<T>(input, tile, true, true, 2, 32, 192, 6, 10, tolerance);
    }
    // The group norm (+ SiLU) ahead of a residual block's convolutions, done in the copy: 3×3 and
    // temporal, planes of whole packs and not (the statistics pass packs or not).
    const ConvTile<T>& tile = tiles.front();
    conv_case<T>(input, tile, true, true, 2, 64, 48, 5, 8, tolerance, 1, 1, 8, true);
    conv_case<T>(input, tile, true, false, 3, 96, 40, 5, 7, tolerance, 1, 1, 32, false);
    conv_case<T>(input, tile, false, true, 2, 64, 40, 4, 24, tolerance, 1, 1, 16, true);
    // A temporal block's convolutions on frames (n·t, c, s), normalised as the video: frames of
    // whole packs and not, odd frame sizes (no paired stores), with and without the extras.
    for (const ConvTile<T>& tile : tiles) {
        conv_case<T>(input, tile, false, true, 2, 64, 40, 5, 24, tolerance, 1, 1, 16, true, true);
        conv_case<T>(input, tile, false, false, 3, 32, 130, 4, 9, tolerance, 1, 1, 8, false, true);
    }
    conv_case<T>(input, tile, false, true, 1, 96, 48, 6, 15, tolerance, 1, 1, 0, false, true);
}


// ---- permutes (src/cuda/permute.rs makes the plans: its CPU test checks them against candle's
// permute; here the kernels carry hand-made plans of the UNet's kinds of permute)

// out = in.permute(dims) for a contiguous `shape`, by strides.
std::vector<uint16_t> permuted(const std::vector<uint16_t>& in, const std::vector<int64_t>& shape, const std::vector<int>& dims) {
    const size_t rank = shape.size();
    std::vector<int64_t> in_strides(rank, 1), out_shape(rank);
    for (size_t d = rank - 1; d > 0; --d) in_strides[d - 1] = in_strides[d] * shape[d];
    for (size_t d = 0; d < rank; ++d) out_shape[d] = shape[dims[d]];
    std::vector<uint16_t> out(in.size());
    for (size_t i = 0; i < out.size(); ++i) {
        size_t rest = i, source = 0;
        for (size_t d = rank; d-- > 0;) {
            source += (rest % out_shape[d]) * in_strides[dims[d]];
            rest /= out_shape[d];
        }
        out[i] = in[source];
    }
    return out;
}

template <typename W>
void permute_case(const char* name, const std::vector<int64_t>& shape, const std::vector<int>& dims,
                  const std::function<void(const W*, W*, int64_t)>& kernel, dim3 grid, dim3 block) {
    size_t n = 1;
    for (int64_t d : shape) n *= d;
    Buffer<uint16_t> in(n), out(n);
    for (size_t i = 0; i < n; ++i) in[i] = static_cast<uint16_t>(rng());
    emu::launch(grid, block, [&] {
        kernel(reinterpret_cast<const W*>(in.data()), reinterpret_cast<W*>(out.data()), (int64_t)(n * 2 / sizeof(W)));
    });
    const std::vector<uint16_t> want = permuted(std::vector<uint16_t>(in.data(), in.data() + n), shape, dims);
    size_t bad = 0;
    for (size_t i = 0; i < n; ++i) bad += out[i] != want[i];
    char detail[120];
    std::snprintf(detail, sizeof detail, "%zu of %zu elements misplaced%s", bad, n,
                  out.guards_intact() ? "" : ", wrote outside its output");
    report(std::string("permute ") + name, bad == 0 && out.guards_intact(), detail);
}

void permutes() {
    // frames → video: (b 2, t 3, c 5, hw 16) → (b, c, t, hw): rows of 16 elements, outer axes
    // (b, c, t) with input strides (240, 16, 80); as 16-, 4- and 2-byte words.
    const std::vector<int64_t> video{2, 3, 5, 16};
    const std::vector<int> to_video{0, 2, 1, 3};
    for (int word : {16, 4, 2}) {
        const int per = word / 2;
        Blocks b{3, {2, 5, 3}, {240 / per, 16 / per, 80 / per}};
        const int64_t inner = 16 / per;
        auto launch = [&](auto kernel, auto* tag) {
            using W = std::remove_pointer_t<decltype(tag)>;
            permute_case<W>((std::string("rows of ") + std::to_string(word) + "-byte words").c_str(), video, to_video,
                            [&](const W* in, W* out, int64_t total) { kernel(in, out, b, inner, total); },
                            dim3{2, 1, 1}, dim3{64, 1, 1});
        };
        if (word == 16) launch(permute_blocks_b128, (uint4*)nullptr);
        if (word == 4) launch(permute_blocks_b32, (uint32_t*)nullptr);
        if (word == 2) launch(permute_blocks_b16, (uint16_t*)nullptr);
    }
    // The 32-bit index forms.
    for (int word : {16, 2}) {
        const int per = word / 2;
        Blocks b{3, {2, 5, 3}, {240 / per, 16 / per, 80 / per}};
        const uint32_t inner = 16 / per;
        if (word == 16)
            permute_case<uint4>("rows of 16-byte words, 32-bit indices", video, to_video,
                                [&](const uint4* in, uint4* out, int64_t total) {
                                    permute_blocks_b128_i32(in, out, b, inner, (uint32_t)total);
                                },
                                dim3{2, 1, 1}, dim3{64, 1, 1});
        else
            permute_case<uint16_t>("rows of 2-byte words, 32-bit indices", video, to_video,
                                   [&](const uint16_t* in, uint16_t* out, int64_t total) {
                                       permute_blocks_b16_i32(in, out, b, inner, (uint32_t)total);
                                   },
                                   dim3{2, 1, 1}, dim3{64, 1, 1});
    }
    // channels → tokens: (n 2, c 40, hw 70) → (n, hw, c): I = hw, J = c, one batch axis.
    {
        Tiles t{70, 40, 70, 40, 1, {2}, {2800}, {2800}};
        permute_case<uint16_t>("tiles (n, c, hw) -> (n, hw, c)", {2, 40, 70}, {0, 2, 1},
                               [&](const uint16_t* in, uint16_t* out, int64_t) { permute_tiles_b16(in, out, t, 2); },
                               dim3{3, 2, 2}, dim3{32, 8, 1});
    }
    // video → temporal tokens: (b 2, c 33, t 5, hw 36) → (b, hw, t, c): I = hw, J = c, batch
    // axes b and t; the grid's z shorter than the batches (it strides).
    {
        Tiles t{36, 33, 180, 165, 2, {2, 5}, {5940, 36}, {5940, 33}};
        permute_case<uint16_t>("tiles (b, c, t, hw) -> (b, hw, t, c)", {2, 33, 5, 36}, {0, 3, 2, 1},
                               [&](const uint16_t* in, uint16_t* out, int64_t) { permute_tiles_b16(in, out, t, 10); },
                               dim3{2, 2, 3}, dim3{32, 8, 1});
    }
}

}  // namespace

// Arguments: the parts to run (attention, conv, permute, group_norm, epilogue); none: all.
int main(int argc, char** argv) {
    auto wanted = [&](const char* part) {
        if (argc < 2) return true;
        for (int i = 1; i < argc; ++i)
            if (std::string(argv[i]) == part) return true;
        return false;
    };
    if (wanted("attention")) {
#define KERNEL_SET(PREFIX, BLOCK_QUERIES, THREADS)                                                          \
    AttentionKernels {                                                                                      \
        #PREFIX, BLOCK_QUERIES, THREADS,                                                                    \
            {(AttentionKernel)PREFIX##_f16_d16, (AttentionKernel)PREFIX##_f16_d32,                          \
             (AttentionKernel)PREFIX##_f16_d64, (AttentionKernel)PREFIX##_f16_d128},                        \
            {(AttentionKernel)PREFIX##_bf16_d16, (AttentionKernel)PREFIX##_bf16_d32,                        \
             (AttentionKernel)PREFIX##_bf16_d64, (AttentionKernel)PREFIX##_bf16_d128},                      \
    }
        // Queries per block and threads: flash_attention.rs's launchers.
        attention(KERNEL_SET(flash_attention, 64, 128));
        attention(KERNEL_SET(flash_attention2, 128, 256));
        // A warp per (batch, head), at most 16 queries (the temporal attention).
        AttentionKernels short_set = KERNEL_SET(flash_attention_short, 64, 128);
        short_set.max_queries = 16;
        attention(short_set);
        // 32 rows per warp: 4 warps, head dimensions up to 64.
        attention(AttentionKernels{"flash_attention2w", 128, 128,
                                   {(AttentionKernel)flash_attention2w_f16_d16, (AttentionKernel)flash_attention2w_f16_d32,
                                    (AttentionKernel)flash_attention2w_f16_d64, nullptr},
                                   {(AttentionKernel)flash_attention2w_bf16_d16, (AttentionKernel)flash_attention2w_bf16_d32,
                                    (AttentionKernel)flash_attention2w_bf16_d64, nullptr}});
    }
    if (wanted("conv")) {
        // The products' inputs are exact; the error is the output's rounding (and f32 sums).
#define CONV_TILES(NAME, T)                                                                                 \
    std::vector<ConvTile<T>> {                                                                              \
        {"128x128 2 stages", conv_igemm_128x128_s2_##NAME, 128, 128},                                      \
            {"128x128 3 stages", conv_igemm_128x128_s3_##NAME, 128, 128},                                  \
            {"128x128 4 stages", conv_igemm_128x128_s4_##NAME, 128, 128},                                  \
            {"128x256 3 stages", conv_igemm_128x256_s3_##NAME, 128, 256},                                  \
            {"64x256 3 stages", conv_igemm_64x256_s3_##NAME, 64, 256},                                     \
    }
        // Every tile in bf16; f16 differs in the mma's type only: two tiles.
        convolutions<__half>({to_channels_last_f16, group_stats_f16},
                             {{"128x128 2 stages", conv_igemm_128x128_s2_f16, 128, 128}, {"64x256 3 stages", conv_igemm_64x256_s3_f16, 64, 256}},
                             1e-3);
        convolutions<__nv_bfloat16>({to_channels_last_bf16, group_stats_bf16}, CONV_TILES(bf16, __nv_bfloat16), 5e-3);
    }
    if (wanted("permute")) permutes();
    if (wanted("group_norm")) {
        group_norm<float>(group_stats_f32, group_apply_f32, 1e-5);
        group_norm<__half>(group_stats_f16, group_apply_f16, 1e-3);
        group_norm<__nv_bfloat16>(group_stats_bf16, group_apply_bf16, 5e-3);
    }
    if (wanted("epilogue")) {
        epilogues<float>(bias_rows_f32, geglu_bias_f32, bias_channels_f32, conv_bias_f32);
        epilogues<__half>(bias_rows_f16, geglu_bias_f16, bias_channels_f16, conv_bias_f16);
        epilogues<__nv_bfloat16>(bias_rows_bf16, geglu_bias_bf16, bias_channels_bf16, conv_bias_bf16);
        add_layer_norms<float>(add_layer_norm_f32, 1e-5);
        add_layer_norms<__half>(add_layer_norm_f16, 1e-3);
        add_layer_norms<__nv_bfloat16>(add_layer_norm_bf16, 5e-3);
        permute_bias_adds<float>(permute_bias_add_f32);
        permute_bias_adds<__half>(permute_bias_add_f16);
        permute_bias_adds<__nv_bfloat16>(permute_bias_add_bf16);
    }
    std::printf("%d failed\n", failures);
    return failures == 0 ? 0 : 1;
}
