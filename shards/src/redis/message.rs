//! The text a write publishes on its group's channel (composed by the Lua scripts in
//! `scripts`, read here by every node subscribed to the channel):
//!
//! ```text
//! <seq> <timestamp ms> <kind> <item length | -> <item><rest>
//! ```
//!
//! `kind` is `c`/`u`/`d` (create, update, delete; `rest` is the value's JSON text) or `e` (a
//! `stream::send` event; `rest` is `<type length> <type><data JSON>`). `seq` is the group's
//! sequence number, incremented by the same script that stored the write, so each node can tell
//! what its snapshot already holds and notice a gap.
//!
//! Messages come from the network (any client of the Redis server may publish on the channel),
//! so the parser must not panic on any input.
#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

/// What an event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Create,
    Update,
    Delete,
    /// A `stream::send` event (nothing stored).
    Custom,
}

impl Kind {
    pub fn code(self) -> &'static str {
        match self {
            Kind::Create => "c",
            Kind::Update => "u",
            Kind::Delete => "d",
            Kind::Custom => "e",
        }
    }

    /// The event type subscribers see for a stored change.
    pub fn event_type(self) -> &'static str {
        match self {
            Kind::Create => "create",
            Kind::Update => "update",
            Kind::Delete => "delete",
            Kind::Custom => "event",
        }
    }
}

/// One published event, borrowed from the message bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Event<'a> {
    pub seq: u64,
    pub timestamp: u64,
    pub kind: Kind,
    pub item: Option<&'a str>,
    /// `stream::send` events: their `type`.
    pub event_type: Option<&'a str>,
    /// JSON text of the value (or of the custom event's data).
    pub data: &'a str,
}

/// Why a message on a group channel cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed event message on a group channel ({0})")]
pub struct MessageError(&'static str);

/// Splits `<field> ` off the front of `rest`.
fn field<'a>(rest: &mut &'a [u8], what: &'static str) -> Result<&'a [u8], MessageError> {
    let space = rest.iter().position(|&b| b == b' ').ok_or(MessageError(what))?;
    let value = rest.get(..space).ok_or(MessageError(what))?;
    *rest = rest.get(space + 1..).ok_or(MessageError(what))?;
    Ok(value)
}

fn number<T: std::str::FromStr>(bytes: &[u8], what: &'static str) -> Result<T, MessageError> {
    std::str::from_utf8(bytes).ok().and_then(|s| s.parse().ok()).ok_or(MessageError(what))
}

/// `<length> <bytes>` as text; `-` for none when `optional`.
fn counted<'a>(rest: &mut &'a [u8], what: &'static str, optional: bool) -> Result<Option<&'a str>, MessageError> {
    let len = field(rest, what)?;
    if optional && len == b"-" {
        return Ok(None);
    }
    let len: usize = number(len, what)?;
    let bytes = rest.get(..len).ok_or(MessageError(what))?;
    *rest = rest.get(len..).ok_or(MessageError(what))?;
    std::str::from_utf8(bytes).map(Some).map_err(|_| MessageError(what))
}

/// Reads one message.
pub fn parse(message: &[u8]) -> Result<Event<'_>, MessageError> {
    let mut rest = message;
    let seq = number(field(&mut rest, "sequence")?, "sequence")?;
    let timestamp = number(field(&mut rest, "timestamp")?, "timestamp")?;
    let kind = match field(&mut rest, "kind")? {
        b"c" => Kind::Create,
        b"u" => Kind::Update,
        b"d" => Kind::Delete,
        b"e" => Kind::Custom,
        _ => return Err(MessageError("kind")),
    };
    let item = counted(&mut rest, "item", true)?;
    let event_type = match kind {
        Kind::Custom => Some(counted(&mut rest, "event type", false)?.ok_or(MessageError("event type"))?),
        _ => None,
    };
    let data = std::str::from_utf8(rest).map_err(|_| MessageError("data"))?;
    if data.is_empty() {
        return Err(MessageError("data"));
    }
    Ok(Event { seq, timestamp, kind, item, event_type, data })
}

/// The part after `<seq> ` of a custom event, as `stream::send` hands it to its script (which
/// prefixes the sequence number).
pub fn custom_tail(timestamp: u64, item: Option<&str>, event_type: &str, data: &str) -> Vec<u8> {
    let mut out = format!("{timestamp} e ").into_bytes();
    match item {
        Some(item) => out.extend_from_slice(format!("{} {item}", item.len()).as_bytes()),
        None => out.extend_from_slice(b"- "),
    }
    out.extend_from_slice(format!("{} {event_type}", event_type.len()).as_bytes());
    out.extend_from_slice(data.as_bytes());
    out
}

/// The part after `<seq> ` of a change event whose storage was done by a custom function.
pub fn change_tail(timestamp: u64, kind: Kind, item: Option<&str>, data: &str) -> Vec<u8> {
    let mut out = format!("{timestamp} {} ", kind.code()).into_bytes();
    match item {
        Some(item) => out.extend_from_slice(format!("{} {item}", item.len()).as_bytes()),
        None => out.extend_from_slice(b"- "),
    }
    out.extend_from_slice(data.as_bytes());
    out
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn stored_changes_and_custom_events_read_back() {
        let m = parse(b"7 1700000000000 c 5 a b c{\"x\":1}").unwrap();
        assert_eq!(m, Event { seq: 7, timestamp: 1_700_000_000_000, kind: Kind::Create, item: Some("a b c"), event_type: None, data: "{\"x\":1}" });
        let tail = custom_tail(5, None, "typing now", "{}");
        let mut whole = b"8 ".to_vec();
        whole.extend_from_slice(&tail);
        let m = parse(&whole).unwrap();
        assert_eq!((m.seq, m.kind, m.item, m.event_type, m.data), (8, Kind::Custom, None, Some("typing now"), "{}"));
        let mut whole = b"9 ".to_vec();
        whole.extend_from_slice(&change_tail(5, Kind::Delete, Some("i"), "null"));
        assert_eq!(parse(&whole).unwrap().kind, Kind::Delete);
    }

    #[test]
    fn malformed_messages_are_errors() {
        for bad in [&b""[..], b"x 1 c - 1", b"1 1 z - 1", b"1 1 c 99 ab", b"1 1 c 1 a", b"1 1 e - 9 ab1", b"1 1 c - \xff"] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
