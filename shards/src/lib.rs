//! Thread-per-core runtime of ringcast: which executor runs on which CPU, how much locked memory
//! each may use for io_uring, and starting pinned glommio executors.

pub mod runtime;
