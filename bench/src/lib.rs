//! Criterion benches of ringcast's hot paths live in `benches/`: `cargo bench -p ringcast-bench`.
