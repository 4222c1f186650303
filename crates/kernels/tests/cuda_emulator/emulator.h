// Runs our CUDA kernels' source on the CPU, so their logic is tested without a GPU: every thread
// of a block is a fiber (ucontext), switched at barriers and warp collectives in a seeded random
// order (or one warp ahead of the others); __shared__ is memory shared by the block's fibers; the warp-wide PTX instructions our
// kernels use (mma.sync m16n8k16, ldmatrix, shuffles) are computed from all 32 lanes' operands as
// the PTX ISA lays them out; cp.async copies land at a random point between their issue and the
// wait that covers them, so a missing wait or barrier reads stale data.
//
// What it does not model: timing, memory coalescing, bank conflicts, register pressure, address
// spaces (only the 16-byte alignment ldmatrix and cp.async require is checked). Numbers from
// the emulator say a kernel computes the right thing, never how fast.
//
// The kernels include <cuda_fp16.h> / <cuda_bf16.h>; this folder's headers of those names
// (first on the include path) bring in this file instead, and `ptx.cuh` skips its inline PTX
// under DYNAMICRAFTER_CUDA_EMULATOR.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#define DYNAMICRAFTER_CUDA_EMULATOR 1

// ---- CUDA's keywords. One OS thread runs every fiber, so thread_local is "one per block run".
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ thread_local
#define __align__(n) __attribute__((aligned(n)))

struct alignas(16) uint4 {
    uint32_t x, y, z, w;
};
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return uint4{x, y, z, w}; }
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

using std::max;
using std::min;

// ---- 16-bit floats, rounded to nearest even as the device's conversions do.
struct __half {
    uint16_t bits = 0;
    __half() = default;
    __half(float f) {
        _Float16 h = static_cast<_Float16>(f);
        std::memcpy(&bits, &h, 2);
    }
    operator float() const {
        _Float16 h;
        std::memcpy(&h, &bits, 2);
        return static_cast<float>(h);
    }
};
struct __nv_bfloat16 {
    uint16_t bits = 0;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) {
        uint32_t u;
        std::memcpy(&u, &f, 4);
        if (std::isnan(f)) {
            bits = 0x7fc0;
        } else {
            u += 0x7fff + ((u >> 16) & 1);
            bits = static_cast<uint16_t>(u >> 16);
        }
    }
    operator float() const {
        uint32_t u = static_cast<uint32_t>(bits) << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    }
};
struct __half2 {
    __half x, y;
};
struct __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
inline float __half2float(__half h) { return float(h); }
inline float __bfloat162float(__nv_bfloat16 h) { return float(h); }
inline __half __float2half(float f) { return __half(f); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __half2 __floats2half2_rn(float a, float b) { return {__half(a), __half(b)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__nv_bfloat16(a), __nv_bfloat16(b)}; }
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }

namespace emu {

[[noreturn]] inline void die(const char* what) {
    std::fprintf(stderr, "cuda emulator: %s\n", what);
    std::exit(3);
}

struct Copy {
    void* dst;
    uint8_t bytes[16];
};

struct Fiber {
    ucontext_t context;
    std::vector<char> stack;
    dim3 thread_idx;
    unsigned lane = 0, warp = 0;
    bool done = false;
    // Blocked until *wait_on != wait_value (a barrier's generation moved on).
    const uint64_t* wait_on = nullptr;
    uint64_t wait_value = 0;
    // cp.async: issued but not committed, and committed groups oldest first.
    std::vector<Copy> open;
    std::vector<std::vector<Copy>> committed;
};

struct Warp {
    unsigned arrived = 0;
    uint64_t generation = 0;
    uint64_t slot[32][8];  // each lane's operands of the collective in progress
};

struct State {
    dim3 grid, block, block_idx;
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    size_t current = 0;
    ucontext_t scheduler;
    unsigned block_arrived = 0;
    uint64_t block_generation = 0;
    std::function<void()> body;
    std::mt19937_64 rng{0x5eed};
    // Per block, drawn at random: which thread runs next (any at random, or the runnable one of the
    // warp ranked first: one warp runs ahead as far as the barriers let it, which exposes a
    // buffer refilled before every warp is done with it) and whether copies land as soon as
    // their thread is switched out (exposes the same) or at random until their wait (exposes a
    // missing wait).
    bool warp_priority = false;
    bool eager_copies = false;
    std::vector<unsigned> warp_rank;
};

inline State& state() {
    static State s;
    return s;
}
inline Fiber& me() { return state().fibers[state().current]; }

inline void land(std::vector<Copy>& copies) {
    for (const Copy& c : copies) std::memcpy(c.dst, c.bytes, 16);
    copies.clear();
}

// Copies in flight may land whenever their thread is switched out: oldest group first.
inline void land_some(Fiber& f) {
    if (state().eager_copies) {
        for (auto& group : f.committed) land(group);
        f.committed.clear();
        land(f.open);
        return;
    }
    auto& rng = state().rng;
    size_t landed = 0;
    while (landed < f.committed.size() && rng() % 2) land(f.committed[landed++]);
    f.committed.erase(f.committed.begin(), f.committed.begin() + landed);
    if (f.committed.empty() && rng() % 4 == 0) land(f.open);
}

inline void yield() {
    Fiber& f = me();
    land_some(f);
    swapcontext(&f.context, &state().scheduler);
}

inline void block_until_changed(const uint64_t* counter, uint64_t value) {
    Fiber& f = me();
    f.wait_on = counter;
    f.wait_value = value;
    yield();
}

// Every lane of the warp arrives before any goes on (full warps only: our kernels use no masks).
inline void warp_barrier() {
    Warp& w = state().warps[me().warp];
    const uint64_t generation = w.generation;
    if (++w.arrived == 32) {
        w.arrived = 0;
        ++w.generation;
        yield();
    } else {
        block_until_changed(&w.generation, generation);
    }
}

inline Warp& warp() { return state().warps[me().warp]; }
inline unsigned lane() { return me().lane; }

inline void fiber_entry() {
    state().body();
    me().done = true;  // returns to the scheduler through uc_link
}

// Runs `body` as every thread of every block, blocks one after another (each in a random
// thread order). Dynamic shared memory is filled with NaNs (0xff bytes) before each block.
void launch(dim3 grid, dim3 block, std::function<void()> body);

}  // namespace emu

// Dynamic shared memory (`extern __shared__ unsigned char dynamic_smem[]` in a kernel).
constexpr size_t EMULATED_SHARED_BYTES = 228 * 1024;
inline thread_local __attribute__((aligned(128))) unsigned char dynamic_smem[EMULATED_SHARED_BYTES];

inline void emu::launch(dim3 grid, dim3 block, std::function<void()> body) {
    State& s = state();
    const unsigned threads = block.x * block.y * block.z;
    if (threads == 0 || threads % 32 != 0 || threads > 1024) die("block size must be a multiple of 32, at most 1024");
    s.grid = grid;
    s.block = block;
    s.body = std::move(body);
    s.fibers.assign(threads, Fiber{});
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                s.block_idx = dim3{bx, by, bz};
                s.warps.assign(threads / 32, Warp{});
                s.block_arrived = 0;
                s.warp_priority = s.rng() % 2;
                s.eager_copies = s.rng() % 2;
                s.warp_rank.resize(threads / 32);
                for (unsigned w = 0; w < threads / 32; ++w) s.warp_rank[w] = w;
                std::shuffle(s.warp_rank.begin(), s.warp_rank.end(), s.rng);
                std::memset(dynamic_smem, 0xff, sizeof dynamic_smem);
                for (unsigned t = 0; t < threads; ++t) {
                    Fiber& f = s.fibers[t];
                    std::vector<char> stack = std::move(f.stack);
                    f = Fiber{};
                    f.stack = std::move(stack);
                    f.thread_idx = dim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                    f.lane = t % 32;
                    f.warp = t / 32;
                    f.stack.resize(256 * 1024);
                    getcontext(&f.context);
                    f.context.uc_stack.ss_sp = f.stack.data();
                    f.context.uc_stack.ss_size = f.stack.size();
                    f.context.uc_link = &s.scheduler;
                    makecontext(&f.context, fiber_entry, 0);
                }
                std::vector<size_t> runnable;
                for (;;) {
                    runnable.clear();
                    bool all_done = true;
                    for (size_t t = 0; t < threads; ++t) {
                        const Fiber& f = s.fibers[t];
                        if (f.done) continue;
                        all_done = false;
                        if (!f.wait_on || *f.wait_on != f.wait_value) runnable.push_back(t);
                    }
                    if (all_done) break;
                    if (runnable.empty()) die("deadlock: every live thread waits at a barrier or collective");
                    if (s.warp_priority) {
                        unsigned best = ~0u;
                        for (size_t t : runnable) best = std::min(best, s.warp_rank[s.fibers[t].warp]);
                        runnable.erase(std::remove_if(runnable.begin(), runnable.end(),
                                                      [&](size_t t) { return s.warp_rank[s.fibers[t].warp] != best; }),
                                       runnable.end());
                    }
                    s.current = runnable[s.rng() % runnable.size()];
                    s.fibers[s.current].wait_on = nullptr;
                    swapcontext(&s.scheduler, &s.fibers[s.current].context);
                }
                for (Fiber& f : s.fibers) {
                    for (auto& group : f.committed) land(group);
                    land(f.open);
                }
            }
}

// ---- The thread's coordinates.
#define threadIdx (::emu::me().thread_idx)
#define blockIdx (::emu::state().block_idx)
#define blockDim (::emu::state().block)
#define gridDim (::emu::state().grid)

inline void __syncthreads() {
    auto& s = emu::state();
    const uint64_t generation = s.block_generation;
    if (++s.block_arrived == s.fibers.size()) {
        s.block_arrived = 0;
        ++s.block_generation;
        emu::yield();
    } else {
        emu::block_until_changed(&s.block_generation, generation);
    }
}
inline void __syncwarp(unsigned = 0xffffffff) { emu::warp_barrier(); }

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask, int = 32) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    emu::Warp& w = emu::warp();
    const unsigned lane = emu::lane();
    std::memcpy(w.slot[lane], &value, sizeof(T));
    emu::warp_barrier();
    T out;
    std::memcpy(&out, w.slot[lane ^ (unsigned)lane_mask], sizeof(T));
    emu::warp_barrier();
    return out;
}

// No two fibers run at once: a plain add is atomic.
template <typename T>
T atomicAdd(T* address, T value) {
    const T old = *address;
    *address = old + value;
    return old;
}

// ---- ptx.cuh's functions: what each lane receives is spelled out in the PTX ISA's figures for
// mma.m16n8k16 and ldmatrix (g = lane / 4, q = lane % 4).

namespace emu {
template <typename T>
inline float half_at(uint32_t pair, int hi) {
    T v;
    v.bits = static_cast<uint16_t>(hi ? pair >> 16 : pair & 0xffff);
    return float(v);
}
}  // namespace emu

// ex2.approx.ftz: the hardware's is within 2 ulp of 2^x; the CPU's exact one stands in.
inline float exp2_approx(float x) { return std::exp2(x); }

// D = A·B + C for a 16×16 A (row-major fragments), a 16×8 B (column fragments), f32 C/D.
template <typename T>
inline void mma_m16n8k16(float* c, const uint32_t* a, const uint32_t* b) {
    emu::Warp& w = emu::warp();
    const unsigned lane = emu::lane();
    for (int i = 0; i < 4; ++i) w.slot[lane][i] = a[i];
    w.slot[lane][4] = b[0];
    w.slot[lane][5] = b[1];
    emu::warp_barrier();
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l / 4, q = l % 4;
        const uint64_t* s = w.slot[l];
        for (int h = 0; h < 2; ++h) {
            A[g][2 * q + h] = emu::half_at<T>(s[0], h);
            A[g + 8][2 * q + h] = emu::half_at<T>(s[1], h);
            A[g][2 * q + 8 + h] = emu::half_at<T>(s[2], h);
            A[g + 8][2 * q + 8 + h] = emu::half_at<T>(s[3], h);
            B[2 * q + h][g] = emu::half_at<T>(s[4], h);
            B[2 * q + 8 + h][g] = emu::half_at<T>(s[5], h);
        }
    }
    const int g = lane / 4, q = lane % 4;
    const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * q, 2 * q + 1, 2 * q, 2 * q + 1};
    for (int i = 0; i < 4; ++i) {
        float acc = 0.f;
        for (int k = 0; k < 16; ++k) acc += A[rows[i]][k] * B[k][cols[i]];
        c[i] += acc;
    }
    emu::warp_barrier();
}

namespace emu {
// ldmatrix .x1/.x2/.x4: lanes 8i..8i+7 give the row addresses of matrix i (16 bytes each).
inline void ldmatrix(uint32_t* r, int matrices, const void* address, bool trans) {
    Warp& w = warp();
    const unsigned lane = emu::lane();
    // The hardware faults on a row address that is not 16-byte aligned.
    if (lane < 8u * matrices && reinterpret_cast<uintptr_t>(address) % 16 != 0) die("ldmatrix: a row address is not 16-byte aligned");
    w.slot[lane][0] = reinterpret_cast<uintptr_t>(address);
    warp_barrier();
    const int g = lane / 4, q = lane % 4;
    for (int i = 0; i < matrices; ++i) {
        uint16_t lo, hi;
        if (!trans) {  // row g, columns 2q and 2q + 1
            const auto* row = reinterpret_cast<const uint16_t*>(w.slot[8 * i + g][0]);
            lo = row[2 * q];
            hi = row[2 * q + 1];
        } else {  // rows 2q and 2q + 1, column g
            lo = reinterpret_cast<const uint16_t*>(w.slot[8 * i + 2 * q][0])[g];
            hi = reinterpret_cast<const uint16_t*>(w.slot[8 * i + 2 * q + 1][0])[g];
        }
        r[i] = static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
    }
    warp_barrier();
}
}  // namespace emu

inline void ldmatrix_x4(uint32_t* r, const void* smem) { emu::ldmatrix(r, 4, smem, false); }
inline void ldmatrix_x4_trans(uint32_t* r, const void* smem) { emu::ldmatrix(r, 4, smem, true); }
inline void ldmatrix_x2(uint32_t* r, const void* smem) { emu::ldmatrix(r, 2, smem, false); }
inline void ldmatrix_x2_trans(uint32_t* r, const void* smem) { emu::ldmatrix(r, 2, smem, true); }

// 16 bytes global → shared, or 16 zero bytes where !valid; lands later (see land_some).
inline void cp_async_16(void* smem, const void* global, bool valid) {
    // 16-byte copies need 16-byte aligned addresses on both sides (the source only when read).
    if (reinterpret_cast<uintptr_t>(smem) % 16 != 0 || (valid && reinterpret_cast<uintptr_t>(global) % 16 != 0))
        emu::die("cp.async: an address is not 16-byte aligned");
    emu::Copy c;
    c.dst = smem;
    if (valid) {
        std::memcpy(c.bytes, global, 16);
    } else {
        std::memset(c.bytes, 0, 16);
    }
    emu::me().open.push_back(c);
}
inline void cp_async_commit() {
    emu::Fiber& f = emu::me();
    f.committed.push_back(std::move(f.open));
    f.open.clear();
}
// Waits until at most `Pending` of the thread's committed groups are in flight.
template <int Pending>
inline void cp_async_wait() {
    emu::Fiber& f = emu::me();
    while (f.committed.size() > static_cast<size_t>(Pending)) {
        emu::land(f.committed.front());
        f.committed.erase(f.committed.begin());
    }
}
