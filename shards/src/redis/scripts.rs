//! How groups are laid out in Redis, and the Lua scripts that change them atomically.
//!
//! Keys (names may hold any bytes, `:` included: the stream name is length-prefixed, so stream
//! `a:b` group `c` and stream `a` group `b:c` never share a key):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `rc:items:<len>:<stream>:<group>` | hash | item id → the value's JSON text |
//! | `rc:seq:<len>:<stream>:<group>` | string | the group's event sequence number (never reset) |
//! | `rc:groups:<stream>` | set | groups of the stream that hold items |
//! | `rc:streams` | set | streams with at least one such group |
//!
//! Events of a group are published on channel `rc:ev:<len>:<stream>:<group>` (see `message`).
//! Every script that stores also increments the sequence number and publishes, in one atomic
//! step, so the order of sequence numbers is the order of the writes.

/// Key of a group's items.
pub fn items_key(stream: &str, group: &str) -> Vec<u8> {
    format!("rc:items:{}:{stream}:{group}", stream.len()).into_bytes()
}

/// Key of a group's sequence number.
pub fn seq_key(stream: &str, group: &str) -> Vec<u8> {
    format!("rc:seq:{}:{stream}:{group}", stream.len()).into_bytes()
}

/// Key of the set of a stream's groups.
pub fn groups_key(stream: &str) -> Vec<u8> {
    format!("{GROUPS_PREFIX}{stream}").into_bytes()
}

pub const GROUPS_PREFIX: &str = "rc:groups:";
pub const STREAMS_KEY: &[u8] = b"rc:streams";

/// The channel of a group's events.
pub fn channel(stream: &str, group: &str) -> Vec<u8> {
    format!("rc:ev:{}:{stream}:{group}", stream.len()).into_bytes()
}

/// The scripts, loaded on every connection (`SCRIPT LOAD`) and run with `EVALSHA`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script {
    Write,
    Delete,
    Publish,
    Snapshot,
    ListAll,
}

impl Script {
    pub const ALL: [Script; 5] = [Script::Write, Script::Delete, Script::Publish, Script::Snapshot, Script::ListAll];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn source(self) -> &'static str {
        match self {
            Script::Write => WRITE,
            Script::Delete => DELETE,
            Script::Publish => PUBLISH,
            Script::Snapshot => SNAPSHOT,
            Script::ListAll => LIST_ALL,
        }
    }
}

/// `set` and the write of `update`.
/// KEYS: items, seq, groups, streams. ARGV: item, mode, expected, value, channel, timestamp,
/// stream, group. `mode` `any` writes unconditionally; `0` only if the item is absent; `1` only
/// if its text is `expected` (the compare-and-set of `update`).
/// Returns `{seq, had_old, old}`; a failed condition returns `{-1, exists, current}`.
const WRITE: &str = r#"
local old = redis.call('HGET', KEYS[1], ARGV[1])
local mode = ARGV[2]
if (mode == '0' and old) or (mode == '1' and ((not old) or old ~= ARGV[3])) then
  if old then return {-1, 1, old} end
  return {-1, 0, ''}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
if not old then
  if redis.call('SADD', KEYS[3], ARGV[8]) == 1 then redis.call('SADD', KEYS[4], ARGV[7]) end
end
local seq = redis.call('INCR', KEYS[2])
local kind = 'c'
if old then kind = 'u' end
redis.call('PUBLISH', ARGV[5], seq .. ' ' .. ARGV[6] .. ' ' .. kind .. ' ' .. #ARGV[1] .. ' ' .. ARGV[1] .. ARGV[4])
if old then return {seq, 1, old} end
return {seq, 0, ''}
"#;

/// `delete`. KEYS: items, seq, groups, streams. ARGV: item, channel, timestamp, stream, group.
/// Returns `{seq, 1, old}`, or `{0, 0, ''}` when there was nothing to delete (no event).
const DELETE: &str = r#"
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return {0, 0, ''} end
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[3], ARGV[5])
  if redis.call('SCARD', KEYS[3]) == 0 then redis.call('SREM', KEYS[4], ARGV[4]) end
end
local seq = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[2], seq .. ' ' .. ARGV[3] .. ' d ' .. #ARGV[1] .. ' ' .. ARGV[1] .. old)
return {seq, 1, old}
"#;

/// An event that stores nothing (`stream::send`, or the event of a custom storage function).
/// KEYS: seq. ARGV: channel, the message after its sequence number. Returns the sequence number.
const PUBLISH: &str = r#"
local seq = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[1], seq .. ' ' .. ARGV[2])
return seq
"#;

/// A group's items and the sequence number they are current at. KEYS: items, seq.
/// Returns `{seq, {item, value, item, value, …}}`.
const SNAPSHOT: &str = r#"
return {redis.call('GET', KEYS[2]) or '0', redis.call('HGETALL', KEYS[1])}
"#;

/// Every stream and its groups. KEYS: streams. ARGV: the prefix of the groups keys.
/// Returns `{stream, {groups…}, stream, {groups…}, …}`.
const LIST_ALL: &str = r#"
local out = {}
for _, s in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  table.insert(out, s)
  table.insert(out, redis.call('SMEMBERS', ARGV[1] .. s))
end
return out
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_colons_get_distinct_keys() {
        assert_ne!(items_key("a:b", "c"), items_key("a", "b:c"));
        assert_ne!(channel("a:b", "c"), channel("a", "b:c"));
        assert_eq!(items_key("chat", "room"), b"rc:items:4:chat:room");
    }
}
