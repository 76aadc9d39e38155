//! The byte pattern the RDMA client writes and the verifiers check; it lives
//! in `pinlab_scenarios::plan` so the host can search for it too.

pub use pinlab_scenarios::plan::{
    fill_pattern, first_pattern_mismatch, pattern_block_index, BlockCensus, UniformBlocks, DEFAULT_SEED,
};
