//! Which shard owns a `(stream_name, group_id)` pair. The hash is fixed (FNV-1a), not seeded, so
//! every core, and every restart, agrees on the owner.

/// Index of the shard that owns the group, in `0..shards`.
pub fn owner_shard(stream: &str, group: &str, shards: usize) -> usize {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    // 0xff never occurs in UTF-8, so ("a:b","c") and ("a","b:c") hash apart.
    for byte in stream.bytes().chain(std::iter::once(0xff)).chain(group.bytes()) {
        hash ^= byte as u64;
        hash = hash.wrapping_mul(PRIME);
    }
    (hash % shards.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_is_stable_and_in_range() {
        for shards in 1..8 {
            let a = owner_shard("chat", "room-1", shards);
            assert!(a < shards);
            assert_eq!(a, owner_shard("chat", "room-1", shards));
        }
    }

    #[test]
    fn groups_spread_over_shards() {
        let mut seen = [0usize; 4];
        for g in 0..400 {
            seen[owner_shard("s", &format!("g{g}"), 4)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }
}
