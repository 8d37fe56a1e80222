//! The bodies of the fuzz targets, one function per target (`fuzz_targets/<name>.rs` calls
//! `ringcast_fuzz::<name>`). They reach the engine only through `ringcast::fuzzing` and public
//! crate APIs. Besides "never panics", each checks what is certain about its parser; a failed
//! check is a panic, which libFuzzer reports as a crash.

mod update_model;

use bytes::BytesMut;
use ringcast::fuzzing::{self, UpgradeOutcome, WorkerFrame};
use ringcast_shards::wsframe::{self, ClientFrame, FrameError};

pub use update_model::update_ops;

/// One inbound worker-protocol frame.
pub fn worker_frame(data: &[u8]) {
    let outcome = fuzzing::worker_frame(data, fuzzing::WORKER_MAX_JSON_DEPTH);
    // Too deep is refused before any recursive parse, unless it is a call or a result, whose
    // payload is relayed unparsed.
    if fuzzing::worker_depth_exceeds(data, fuzzing::WORKER_MAX_JSON_DEPTH) {
        assert!(
            !matches!(outcome, WorkerFrame::Decoded { relayed: false }),
            "a frame over the depth limit got {outcome:?}"
        );
    }
    // A tight limit exercises the depth scan's refusals on ordinary frames.
    let _ = fuzzing::worker_frame(data, 2);
}

/// Largest client frame payload in the subscriber target: small, so that the over-limit path is
/// reached often.
const SUBSCRIBER_MAX_FRAME: usize = 200;

/// Client frames parsed off a read buffer, first from all the bytes at once, then from the same
/// bytes arriving in small chunks: both must give the same frames and the same error. Every data
/// frame's payload (and the raw input) goes through the join/leave decoding.
pub fn subscriber_frame(data: &[u8]) {
    let Some((&first, stream)) = data.split_first() else { return };
    let chunk = usize::from(first % 16) + 1;

    let (whole, rest_whole) = parse_frames(stream, stream.len().max(1));
    let (chunked, rest_chunked) = parse_frames(stream, chunk);
    assert_eq!(whole, chunked, "frames differ when the bytes arrive {chunk} at a time");
    assert_eq!(rest_whole, rest_chunked, "unconsumed bytes differ when fed {chunk} at a time");

    for result in &whole {
        match result {
            Ok(frame) => {
                assert!(frame.payload.len() <= SUBSCRIBER_MAX_FRAME, "a frame over max_frame was accepted");
                let _ = fuzzing::subscriber_message(&frame.payload);
            }
            Err(FrameError::TooBig(size)) => assert!(*size > SUBSCRIBER_MAX_FRAME as u64),
            Err(FrameError::Malformed) => {}
        }
    }
    let _ = fuzzing::subscriber_message(stream);
}

/// Feeds `bytes` to a read buffer `chunk` bytes at a time, taking every complete frame off after
/// each read as the subscriber reader does; stops at the first error. Returns the frames (and
/// the error) and how many bytes were not taken off as frames (buffered or not yet fed).
fn parse_frames(bytes: &[u8], chunk: usize) -> (Vec<Result<ClientFrame, FrameError>>, usize) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut fed = 0;
    for piece in bytes.chunks(chunk) {
        buf.extend_from_slice(piece);
        fed += piece.len();
        loop {
            match wsframe::parse_client_frame(&mut buf, SUBSCRIBER_MAX_FRAME) {
                Ok(Some(frame)) => out.push(Ok(frame)),
                Ok(None) => break,
                Err(error) => {
                    out.push(Err(error));
                    return (out, buf.len() + bytes.len() - fed);
                }
            }
        }
    }
    (out, buf.len())
}

/// The subscriber port's upgrade request, and the URL helpers on their own. The first byte picks
/// what the rest is: 0..=127 a whole HTTP request, else a request target (path and query).
pub fn upgrade_request(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode < 128 {
        if let UpgradeOutcome::Accepted { path, implicit_join: Some(_), .. } = fuzzing::upgrade_request(rest) {
            assert!(path.starts_with("/stream/"), "implicit join from path {path:?}");
        }
        return;
    }
    let Ok(target) = std::str::from_utf8(rest) else { return };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if let Ok(Some((stream, group, item))) = fuzzing::stream_path(path) {
        assert!(path.starts_with("/stream/"));
        assert!(!stream.is_empty() && !group.is_empty() && item.as_deref() != Some(""));
    }
    let decoded = fuzzing::percent_decode(path);
    if !path.contains('%') {
        assert_eq!(decoded.as_deref(), Some(path), "percent_decode changed a segment without '%'");
    }
    for (name, values) in fuzzing::query_params(query) {
        assert!(!name.is_empty(), "empty query parameter name kept");
        let values = values.as_array().expect("query values are arrays");
        assert!(!values.is_empty() && values.iter().all(|v| v.is_string()));
    }
}

/// The config file parser; `${VAR}` expansion is also checked on its own with a fixed lookup.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = fuzzing::config(text);
    match fuzzing::config_interpolate(text) {
        Ok(expanded) if !text.contains("${") => assert_eq!(expanded, text, "text without ${{ changed"),
        Ok(_) => {}
        Err(message) => assert!(text.contains("${"), "expansion error without ${{: {message}"),
    }
}

/// Splits a store_recovery input into segment files.
pub const SEGMENT_SEPARATOR: &[u8] = b"--seg--";
/// Most segment files one input makes.
const MAX_SEGMENTS: usize = 8;

/// File-store recovery over arbitrary segment bytes (`SEGMENT_SEPARATOR` between files): open
/// must not panic, and a second open must reach exactly the state of the first.
pub fn store_recovery(data: &[u8]) {
    let segments = split_segments(data);
    if let Ok((first, second)) = fuzzing::store_recovery(&segments) {
        assert_eq!(first, second, "a second open recovered a different store");
    }
}

/// At most `MAX_SEGMENTS` pieces; the last one keeps any further separators.
pub fn split_segments(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while out.len() + 1 < MAX_SEGMENTS {
        match rest.windows(SEGMENT_SEPARATOR.len()).position(|w| w == SEGMENT_SEPARATOR) {
            Some(at) => {
                out.push(&rest[..at]);
                rest = &rest[at + SEGMENT_SEPARATOR.len()..];
            }
            None => break,
        }
    }
    out.push(rest);
    out
}

/// A reply from Redis (the `redis` adapter's RESP2 parser): never panics; a reply parsed from
/// the whole input is reported incomplete — never as an error or another reply — at every
/// shorter cut, as the client sees it while bytes arrive.
pub fn redis_reply(data: &[u8]) {
    use ringcast_shards::redis::resp::{parse, Parsed};
    if let Ok(Parsed::Reply(_, used)) = parse(data) {
        assert!(used <= data.len());
        let step = (used / 64).max(1);
        for cut in (0..used).step_by(step) {
            let prefix = data.get(..cut).unwrap_or_default();
            assert!(matches!(parse(prefix), Ok(Parsed::Incomplete(_))), "a cut at {cut} of a {used}-byte reply was not incomplete");
        }
    }
}

/// An event message on a group channel (published by any Redis client): never panics, and what
/// it reads lies within the message.
pub fn redis_message(data: &[u8]) {
    if let Ok(event) = ringcast_shards::redis::message::parse(data) {
        assert!(!event.data.is_empty());
        assert!(event.data.len() + event.item.map_or(0, str::len) < data.len());
    }
}
