// The PTX instructions our kernels use, in one place: tensor-core products (mma.sync m16n8k16,
// sm_80+), matrix loads from shared memory (ldmatrix), asynchronous global → shared copies
// (cp.async) and the special-function unit's 2^x. The CPU emulator of tests/cuda_emulator
// supplies the same functions, computed from the PTX ISA's fragment layouts, so the kernels'
// logic is tested without a GPU.
//
// Fragment layouts (g = lane / 4, q = lane % 4; a register holds two 16-bit values, the lower
// column in the low half):
//   mma A (16×16): a0 = (g, 2q..2q+1), a1 = (g+8, 2q..), a2 = (g, 2q+8..), a3 = (g+8, 2q+8..)
//   mma B (16×8, k×n): b0 = (k 2q..2q+1, n g), b1 = (k 2q+8.., n g)
//   mma C (16×8): c0,c1 = (g, 2q..2q+1), c2,c3 = (g+8, 2q..2q+1)
//   ldmatrix: lanes 8i..8i+7 give the addresses of the 8 rows (16 bytes each) of matrix i; lane
//   receives r[i] = (row g, columns 2q..2q+1) of matrix i, or with .trans (rows 2q..2q+1, column g).
#pragma once

#ifndef DYNAMICRAFTER_CUDA_EMULATOR

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

template <typename T> __device__ __forceinline__ void mma_m16n8k16(float* c, const uint32_t* a, const uint32_t* b);
template <> __device__ __forceinline__ void mma_m16n8k16<__half>(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 2^x by the special-function unit, subnormal results flushed to zero (one MUFU.EX2; exp2f adds
// instructions to keep subnormals, which a softmax's probabilities do not need).
__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ uint32_t shared_address(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* smem) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(smem)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* smem) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(smem)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t* r, const void* smem) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(shared_address(smem)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t* r, const void* smem) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(shared_address(smem)));
}

// 16 bytes global → shared without passing through registers; where !valid, 16 zero bytes
// (src-size 0: nothing is read from `global`).
__device__ __forceinline__ void cp_async_16(void* smem, const void* global, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(smem)), "l"(global),
                 "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most `Pending` of this thread's committed groups are still in flight.
template <int Pending> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
}

#endif  // DYNAMICRAFTER_CUDA_EMULATOR
