// The implicit-GEMM convolution's arguments (conv_igemm.cu), shared with the CPU emulator's tests.
#pragma once

// The convolution's shape (conv_igemm.rs mirrors it, #[repr(C)]). Output position p = r·cols + c
// of sample s reads, for tap t, the padded input of s at position
// s·plane_p + r·stride·cols_p + c·stride + (t / kw)·row_step + t % kw.
struct ConvGeometry {
    int ci, co;       // input and output channels
    int samples;      // n
    int rows, cols;   // output rows and columns of a sample
    int plane_p;      // positions of a sample's padded input
    int cols_p;       // its width
    int taps, kw;     // taps, kw of them per kernel row
    int row_step;     // input positions from one kernel row to the next
    int stride;       // input columns per output column (rows: stride · cols_p)
};
