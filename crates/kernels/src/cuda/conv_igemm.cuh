// The implicit-GEMM convolution's arguments (conv_igemm.cu), shared with the CPU emulator's tests.
#pragma once

#include <stdint.h>

// The convolution's shape (conv_igemm.rs mirrors it, #[repr(C)]). Output position p = r·cols + c
// of sample s reads, for tap t, the padded input of s at position
// s·plane_p + r·stride·cols_p + c·stride + (t / kw)·row_step + t % kw,
// and is stored (and its residual read) at element
// s·out_sample + channel·out_channel + r·out_row + c: (n, co, rows·cols) is out_row = cols,
// out_channel = rows·cols, out_sample = co·rows·cols; frames (n·rows, co, cols) (a temporal
// convolution's rows are frames) out_row = co·cols, out_channel = cols, out_sample = rows·co·cols.
struct ConvGeometry {
    int64_t out_sample, out_channel, out_row;
    int ci, co;       // input and output channels
    int samples;      // n
    int rows, cols;   // output rows and columns of a sample
    int plane_p;      // positions of a sample's padded input
    int cols_p;       // its width
    int taps, kw;     // taps, kw of them per kernel row
    int row_step;     // input positions from one kernel row to the next
    int stride;       // input columns per output column (rows: stride · cols_p)
};

// Where the channels-last copy reads element (sample, channel, row, col) of its input,
// in_sample·sample + in_channel·channel + in_row·row + col, and writes element (sample, row, col,
// channel) of its output (padded coordinates), out_sample·sample + out_row·row + out_col·col +
// channel. Input (n, c, rows, cols) contiguous is (c·rows·cols, rows·cols, cols); frames
// (n·rows, c, cols) read as (n, c, rows, cols) are (rows·c·cols, cols, c·cols). Output
// (n, rows_p, cols_p, c) is (rows_p·cols_p·c, cols_p·c, c); tokens across frames (n, cols, rows,
// c) (a temporal transformer's (b·h·w, t, c)) are (rows·cols·c, c, rows·c).
struct CopyLayout {
    int64_t in_sample, in_channel, in_row;
    int64_t out_sample, out_row, out_col;
};
