//! What the integration tests share.

use candle_core::Device;

/// The device the tests run on: `DYNAMICRAFTER_TEST_DEVICE` (auto, cpu, cuda, cuda:N; default
/// cpu), so a CUDA build checks the same tolerances on its GPU.
pub fn device() -> Device {
    let name = std::env::var("DYNAMICRAFTER_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    dynamicrafter_engine::device::parse(&name).unwrap_or_else(|e| panic!("DYNAMICRAFTER_TEST_DEVICE: {e}"))
}
