//! Random operation sequences against `MemoryStore` as the model: with reopens and compaction
//! steps in between, and with the last segment cut at a random byte.

use proptest::prelude::*;

use super::tests::{check_accounting, j, snapshot, TempDir};
use super::*;
use crate::memory::MemoryStore;

#[derive(Debug, Clone)]
enum Op {
    Set {
        stream: u8,
        group: u8,
        item: u8,
        len: usize,
    },
    Delete {
        stream: u8,
        group: u8,
        item: u8,
    },
    Reopen,
    Compact(usize),
}

fn names(stream: u8, group: u8, item: u8) -> (String, String, String) {
    (format!("s{stream}"), format!("g{group}"), format!("i{item}"))
}

fn write_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..2u8, 0..3u8, 0..6u8, 0..120usize).prop_map(|(stream, group, item, len)| Op::Set { stream, group, item, len }),
        2 => (0..2u8, 0..3u8, 0..6u8).prop_map(|(stream, group, item)| Op::Delete { stream, group, item }),
    ]
}

fn any_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => write_op(),
        1 => Just(Op::Reopen),
        3 => (1..600usize).prop_map(Op::Compact),
    ]
}

/// Applies a write to both stores and checks they answer alike.
fn apply(file: &mut FileStore, mem: &mut MemoryStore, op: &Op, n: usize) {
    match *op {
        Op::Set {
            stream,
            group,
            item,
            len,
        } => {
            let (s, g, i) = names(stream, group, item);
            let value = j(&format!("\"{i}#{n}:{}\"", "v".repeat(len)));
            assert_eq!(
                file.set(&s, &g, &i, value.clone()).unwrap(),
                mem.set(&s, &g, &i, value).unwrap()
            );
        }
        Op::Delete { stream, group, item } => {
            let (s, g, i) = names(stream, group, item);
            assert_eq!(file.delete(&s, &g, &i).unwrap(), mem.delete(&s, &g, &i).unwrap());
        }
        Op::Reopen | Op::Compact(_) => {}
    }
}

fn options() -> impl Strategy<Value = FileOptions> {
    (
        prop_oneof![Just(128u64), Just(512), Just(2048)],
        prop_oneof![Just(0.0), Just(0.3), Just(0.5), Just(0.9)],
        prop_oneof![Just(Populate::Read), Just(Populate::Write)],
    )
        .prop_map(|(segment_size, compaction_threshold, populate)| FileOptions {
            segment_size,
            compaction_threshold,
            populate,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn behaves_like_the_memory_store(opts in options(), ops in prop::collection::vec(any_op(), 1..150)) {
        let dir = TempDir::new("prop-model");
        let mut file = FileStore::open(&dir.0, opts).unwrap();
        let mut mem = MemoryStore::new();
        for (n, op) in ops.iter().enumerate() {
            match op {
                Op::Reopen => {
                    drop(file);
                    file = FileStore::open(&dir.0, opts).unwrap();
                }
                Op::Compact(max_bytes) => {
                    let progress = file.compact_step(*max_bytes);
                    prop_assert!(!matches!(progress, CompactProgress::Failed(_)), "{:?}", progress);
                }
                _ => apply(&mut file, &mut mem, op, n),
            }
            prop_assert_eq!(snapshot(&file), snapshot(&mem));
            check_accounting(&file);
        }
        for stream in 0..2 {
            for group in 0..3 {
                for item in 0..6 {
                    let (s, g, i) = names(stream, group, item);
                    prop_assert_eq!(file.get(&s, &g, &i), mem.get(&s, &g, &i));
                }
            }
        }
        // Compacting everything, then reopening, changes nothing visible.
        while !matches!(file.compact_step(1 << 20), CompactProgress::Idle) {}
        prop_assert_eq!(snapshot(&file), snapshot(&mem));
        drop(file);
        let file = FileStore::open(&dir.0, opts).unwrap();
        prop_assert_eq!(snapshot(&file), snapshot(&mem));
        check_accounting(&file);
    }

    #[test]
    fn a_cut_last_segment_keeps_everything_before_the_cut(
        segment_size in prop_oneof![Just(256u64), Just(1024), Just(8192)],
        ops in prop::collection::vec(write_op(), 1..80),
        cut_at in 0.0..=1.0f64,
    ) {
        let dir = TempDir::new("prop-cut");
        let opts = FileOptions { segment_size, ..FileOptions::default() };
        let mut file = FileStore::open(&dir.0, opts).unwrap();
        let mut scratch = MemoryStore::new();
        // Where the log ended after each op.
        let mut ends = Vec::new();
        for (n, op) in ops.iter().enumerate() {
            apply(&mut file, &mut scratch, op, n);
            ends.push((file.active, file.segments[&file.active].len));
        }
        let last = file.active;
        let last_len = file.segments[&last].len;
        drop(file);
        let cut = (last_len as f64 * cut_at) as u64;
        let path = dir.0.join(segment::file_name(last));
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(cut).unwrap();

        let survivors = ends.iter().take_while(|&&(seg, end)| seg < last || end <= cut).count();
        let mut expected = MemoryStore::new();
        for (n, op) in ops[..survivors].iter().enumerate() {
            apply_model(&mut expected, op, n);
        }
        let file = FileStore::open(&dir.0, opts).unwrap();
        prop_assert_eq!(snapshot(&file), snapshot(&expected));
        check_accounting(&file);
    }
}

fn apply_model(mem: &mut MemoryStore, op: &Op, n: usize) {
    match *op {
        Op::Set {
            stream,
            group,
            item,
            len,
        } => {
            let (s, g, i) = names(stream, group, item);
            mem.set(&s, &g, &i, j(&format!("\"{i}#{n}:{}\"", "v".repeat(len))))
                .unwrap();
        }
        Op::Delete { stream, group, item } => {
            let (s, g, i) = names(stream, group, item);
            mem.delete(&s, &g, &i).unwrap();
        }
        Op::Reopen | Op::Compact(_) => {}
    }
}
