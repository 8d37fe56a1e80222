//! The on-disk record: one `set` or `delete` of one item, self-describing and checksummed, so a
//! scan can tell a whole record from a torn or damaged one without any other file.
//!
//! Layout (little endian), `HEADER_LEN` = 24 bytes of header, then the payload:
//!
//! ```text
//! 0      magic    u8   0xA6 = format version 2, 0xA5 = version 1; 0 = no record here (end)
//! 1      kind     u8   1 = set, 2 = delete (never 0, so a one-bit flip cannot zero bytes 0..2)
//! 2..4   stream   u16  byte length of the stream name
//! 4..6   group    u16  byte length of the group id
//! 6..8   item     u16  byte length of the item id
//! 8..12  value    u32  byte length of the value (0 for a delete)
//! 12..20 seq      u64  the item's position in its group (kept by overwrites and compaction)
//! 20..24 crc      u32  version 2: CRC-32C of the whole record with these 4 bytes as zeros;
//!                      version 1: CRC-32 (IEEE) of bytes 0..20 and of the payload
//! 24..   stream, group, item, value (UTF-8)
//! ```
//!
//! Version 2 only changed the checksum, to the one CPUs compute in hardware (SSE 4.2 `crc32`,
//! ARMv8 CRC), taken in one pass over the record as it lies in the segment: the checksum had
//! been about a tenth of a `set`. Version 1 records (stores written
//! by earlier releases) are still read, and compaction copies them unchanged.
//!
//! Decoding must never panic on any bytes a file holds: no indexing, no unwraps.
#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

use std::ops::Range;

/// First byte of a record of the format written now (version 2). The magic bytes differ from
/// `0` (end) and from each other in at least two bits, so no single bit flip turns one into
/// another.
pub const MAGIC: u8 = 0xA6;
/// First byte of a version 1 record.
pub const MAGIC_V1: u8 = 0xA5;

/// Whether `byte` can start a record.
pub fn is_magic(byte: u8) -> bool {
    byte == MAGIC || byte == MAGIC_V1
}
pub const HEADER_LEN: usize = 24;
/// Where the checksum lies in the header.
pub const CRC_RANGE: Range<usize> = 20..24;
/// Longest stream name, group id or item id: their lengths are `u16`.
pub const MAX_NAME_LEN: usize = u16::MAX as usize;
/// Longest whole record: offsets and lengths in the index are `u32`.
pub const MAX_RECORD_LEN: usize = u32::MAX as usize;

/// What a record does to its item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Set = 1,
    Delete = 2,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Set),
            2 => Some(Kind::Delete),
            _ => None,
        }
    }
}

/// A record that passed every check, borrowing the mapped bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub kind: Kind,
    pub seq: u64,
    pub stream: &'a str,
    pub group: &'a str,
    pub item: &'a str,
    pub value: &'a str,
    /// Bytes the whole record takes, header included.
    pub len: usize,
}

/// The result of reading at an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    Record(RecordRef<'a>),
    /// The magic byte is 0: nothing was written here (or a write here was lost).
    End,
    /// Bytes that are not a whole, intact record.
    Invalid,
}

/// Why a record cannot be written: the format cannot hold a name or value this long.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// A stream name, group id or item id (`what`) longer than [`MAX_NAME_LEN`].
    #[error("{what} is {len} bytes, longer than the file store's limit of {limit} bytes")]
    NameTooLong { what: &'static str, len: usize, limit: usize },
    /// A value that makes the record longer than [`MAX_RECORD_LEN`].
    #[error("value is {len} bytes, more than the file store's record limit of {limit} bytes")]
    ValueTooLarge { len: usize, limit: usize },
}

/// Bytes a record of these field lengths takes, or why the format cannot hold it.
pub fn encoded_len(stream: usize, group: usize, item: usize, value: usize) -> Result<usize, FormatError> {
    for (what, len) in [("stream name", stream), ("group id", group), ("item id", item)] {
        if len > MAX_NAME_LEN {
            return Err(FormatError::NameTooLong { what, len, limit: MAX_NAME_LEN });
        }
    }
    let total = (HEADER_LEN + stream + group + item).checked_add(value);
    match total {
        Some(total) if total <= MAX_RECORD_LEN => Ok(total),
        _ => Err(FormatError::ValueTooLarge { len: value, limit: MAX_RECORD_LEN }),
    }
}

/// Writes a record into `dst`, which must be exactly `encoded_len(..)` bytes long (a shorter
/// one gets only what fits, and no checksum: it reads back as invalid).
pub fn encode_into(dst: &mut [u8], kind: Kind, seq: u64, stream: &str, group: &str, item: &str, value: &str) {
    debug_assert_eq!(
        Ok(dst.len()),
        encoded_len(stream.len(), group.len(), item.len(), value.len())
    );
    // Built on the stack and copied with wide stores: the checksum then reads it back from the
    // segment without waiting for a dozen narrow stores to retire.
    let mut header = [0u8; HEADER_LEN];
    header[0] = MAGIC;
    header[1] = kind as u8;
    header[2..4].copy_from_slice(&(stream.len() as u16).to_le_bytes());
    header[4..6].copy_from_slice(&(group.len() as u16).to_le_bytes());
    header[6..8].copy_from_slice(&(item.len() as u16).to_le_bytes());
    header[8..12].copy_from_slice(&(value.len() as u32).to_le_bytes());
    header[12..20].copy_from_slice(&seq.to_le_bytes());
    let Some((head, mut payload)) = dst.split_at_mut_checked(HEADER_LEN) else {
        return;
    };
    head.copy_from_slice(&header);
    for part in [stream, group, item, value] {
        let Some((this, rest)) = std::mem::take(&mut payload).split_at_mut_checked(part.len()) else {
            return;
        };
        this.copy_from_slice(part.as_bytes());
        payload = rest;
    }
    // The checksum is written last: a record cut short by a crash has none (see `recovery`).
    let crc = crc32c::crc32c(dst);
    if let Some(field) = dst.get_mut(CRC_RANGE) {
        field.copy_from_slice(&crc.to_le_bytes());
    }
}

/// An encoded record in a fresh buffer.
#[cfg(test)]
pub fn encode(
    kind: Kind,
    seq: u64,
    stream: &str,
    group: &str,
    item: &str,
    value: &str,
) -> Result<Vec<u8>, FormatError> {
    let len = encoded_len(stream.len(), group.len(), item.len(), value.len())?;
    let mut buf = vec![0; len];
    encode_into(&mut buf, kind, seq, stream, group, item, value);
    Ok(buf)
}

/// The checksum that a record starting with `magic` carries, from its first 20 header bytes and
/// its payload.
fn checksum(magic: u8, header: &[u8], payload: &[u8]) -> u32 {
    if magic == MAGIC_V1 {
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(header);
        hasher.update(payload);
        return hasher.finalize();
    }
    crc32c::crc32c_append(crc32c::crc32c_append(crc32c::crc32c(header), &[0; 4]), payload)
}

struct Lengths {
    stream: usize,
    group: usize,
    item: usize,
    value: usize,
}

impl Lengths {
    fn read(header: &[u8; HEADER_LEN]) -> Lengths {
        Lengths {
            stream: u16::from_le_bytes([header[2], header[3]]) as usize,
            group: u16::from_le_bytes([header[4], header[5]]) as usize,
            item: u16::from_le_bytes([header[6], header[7]]) as usize,
            value: u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize,
        }
    }

    fn total(&self) -> usize {
        // At most 3 * 65535 + 2^32 + 24: no overflow on 64-bit targets, and saturating elsewhere.
        HEADER_LEN
            .saturating_add(self.stream)
            .saturating_add(self.group)
            .saturating_add(self.item)
            .saturating_add(self.value)
    }
}

/// The fixed-size header at the start of `buf`, if `buf` is that long.
fn header_of(buf: &[u8]) -> Option<&[u8; HEADER_LEN]> {
    buf.get(..HEADER_LEN)?.try_into().ok()
}

/// Reads the record that starts at `buf[0]` (`buf` runs to the end of the segment), checking
/// everything: magic, kind, lengths, checksum, UTF-8.
pub fn decode(buf: &[u8]) -> Decoded<'_> {
    parse(buf, true)
}

/// Reads a record that this process wrote or verified before (at open): checks its header but
/// not the checksum or UTF-8 again. Compaction scans with it; the records it copies keep their
/// checksums, so damage would still be found at the next open.
pub fn decode_verified(buf: &[u8]) -> Decoded<'_> {
    parse(buf, false)
}

fn parse(buf: &[u8], verify: bool) -> Decoded<'_> {
    let magic = match buf.first() {
        None | Some(0) => return Decoded::End,
        Some(&b) if is_magic(b) => b,
        Some(_) => return Decoded::Invalid,
    };
    parse_record(buf, magic, verify).map_or(Decoded::Invalid, Decoded::Record)
}

/// The record at `buf[0]` (whose magic byte is `magic`), or `None` if it is not whole and intact.
fn parse_record(buf: &[u8], magic: u8, verify: bool) -> Option<RecordRef<'_>> {
    let header = header_of(buf)?;
    let kind = Kind::from_byte(header[1])?;
    let lens = Lengths::read(header);
    let total = lens.total();
    if total > MAX_RECORD_LEN || (kind == Kind::Delete && lens.value != 0) {
        return None;
    }
    let payload = buf.get(HEADER_LEN..total)?;
    let crc = u32::from_le_bytes([header[20], header[21], header[22], header[23]]);
    if verify && checksum(magic, &header[..20], payload) != crc {
        return None;
    }
    let (stream, rest) = payload.split_at_checked(lens.stream)?;
    let (group, rest) = rest.split_at_checked(lens.group)?;
    let (item, value) = rest.split_at_checked(lens.item)?;
    let text = |bytes| {
        if verify {
            std::str::from_utf8(bytes).ok()
        } else {
            debug_assert!(std::str::from_utf8(bytes).is_ok());
            // SAFETY: the caller vouches that this record was verified before (`decode_verified`),
            // and a record's mapped bytes never change afterwards.
            Some(unsafe { std::str::from_utf8_unchecked(bytes) })
        }
    };
    Some(RecordRef {
        kind,
        seq: u64::from_le_bytes([
            header[12], header[13], header[14], header[15], header[16], header[17], header[18], header[19],
        ]),
        stream: text(stream)?,
        group: text(group)?,
        item: text(item)?,
        value: text(value)?,
        len: total,
    })
}

/// How many bytes the (possibly damaged) record at `buf[0]` says it spans, for telling a torn
/// write from damage: the full length when the header is readable, else the header, or the two
/// bytes (magic, kind) that a readable header must start with.
pub fn claimed_len(buf: &[u8]) -> usize {
    let magic_ok = matches!(buf.first(), Some(&b) if b == 0 || is_magic(b));
    if !magic_ok {
        return 1;
    }
    let Some(header) = header_of(buf).filter(|h| h[0] != 0) else {
        return HEADER_LEN;
    };
    if Kind::from_byte(header[1]).is_none() {
        return 2;
    }
    Lengths::read(header).total()
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn set_round_trips() {
        let buf = encode(Kind::Set, 42, "s", "grp", "itém", r#"{"a":1}"#).unwrap();
        assert_eq!(buf.len(), HEADER_LEN + 1 + 3 + 5 + 7);
        let Decoded::Record(rec) = decode(&buf) else {
            panic!("not decoded")
        };
        assert_eq!(
            rec,
            RecordRef {
                kind: Kind::Set,
                seq: 42,
                stream: "s",
                group: "grp",
                item: "itém",
                value: r#"{"a":1}"#,
                len: buf.len()
            }
        );
    }

    #[test]
    fn delete_round_trips_and_trailing_bytes_are_ignored() {
        let mut buf = encode(Kind::Delete, 0, "", "g", "i", "").unwrap();
        let len = buf.len();
        buf.extend_from_slice(&[0; 10]);
        let Decoded::Record(rec) = decode(&buf) else {
            panic!("not decoded")
        };
        assert_eq!(
            (rec.kind, rec.stream, rec.group, rec.item, rec.value, rec.len),
            (Kind::Delete, "", "g", "i", "", len)
        );
        assert_eq!(decode(&buf[len..]), Decoded::End);
        assert_eq!(decode(&[]), Decoded::End);
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let buf = encode(Kind::Set, 7, "stream", "group", "item", r#"[1,"two",{"x":null}]"#).unwrap();
        for byte in 0..buf.len() {
            for bit in 0..8 {
                let mut damaged = buf.clone();
                damaged[byte] ^= 1 << bit;
                assert!(
                    !matches!(decode(&damaged), Decoded::Record(_)),
                    "flip of bit {bit} in byte {byte} went unnoticed"
                );
                // A single flip never makes a record look like the end of the log.
                assert_ne!(decode(&damaged), Decoded::End, "byte {byte} bit {bit}");
            }
        }
    }

    #[test]
    fn every_truncation_is_detected() {
        let buf = encode(Kind::Set, 1, "s", "g", "i", "\"value\"").unwrap();
        for cut in 1..buf.len() {
            assert_eq!(decode(&buf[..cut]), Decoded::Invalid, "cut at {cut}");
            assert!(claimed_len(&buf[..cut]) > cut);
        }
    }

    #[test]
    fn lengths_beyond_the_format_are_refused() {
        assert!(encoded_len(MAX_NAME_LEN, MAX_NAME_LEN, MAX_NAME_LEN, 10).is_ok());
        let err = encoded_len(0, MAX_NAME_LEN + 1, 0, 0).unwrap_err();
        assert!(matches!(err, FormatError::NameTooLong { what: "group id", .. }), "{err}");
        assert!(err.to_string().contains("group id"), "{err}");
        assert!(encoded_len(0, 0, 0, MAX_RECORD_LEN - HEADER_LEN).is_ok());
        let err = encoded_len(0, 0, 0, MAX_RECORD_LEN - HEADER_LEN + 1).unwrap_err();
        assert!(matches!(err, FormatError::ValueTooLarge { .. }), "{err}");
        assert!(err.to_string().contains("record limit"), "{err}");
        assert!(encoded_len(1, 1, 1, usize::MAX).is_err());
    }

    #[test]
    fn version_1_records_are_still_read() {
        // As version 1 wrote it: same layout, CRC-32 (IEEE) of header and payload.
        let mut buf = encode(Kind::Set, 9, "s", "g", "i", "[1]").unwrap();
        buf[0] = MAGIC_V1;
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&buf[..20]);
        hasher.update(&buf[HEADER_LEN..]);
        buf[20..24].copy_from_slice(&hasher.finalize().to_le_bytes());
        let Decoded::Record(rec) = decode(&buf) else {
            panic!("a version 1 record was not read")
        };
        assert_eq!((rec.seq, rec.item, rec.value, rec.len), (9, "i", "[1]", buf.len()));
        // The version 2 checksum does not pass for a version 1 record, nor the other way round.
        buf[0] = MAGIC;
        assert_eq!(decode(&buf), Decoded::Invalid);
    }

    #[test]
    fn a_delete_with_a_value_is_invalid() {
        let mut buf = encode(Kind::Set, 1, "s", "g", "i", "1").unwrap();
        buf[1] = Kind::Delete as u8;
        // Fix the checksum so only the kind/value mismatch is left.
        let crc = checksum(MAGIC, &buf[..20], &buf[HEADER_LEN..]);
        buf[20..24].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&buf), Decoded::Invalid);
    }
}
