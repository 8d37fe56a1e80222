//! The bodies of the fuzz targets, one function per target (`fuzz_targets/<name>.rs` calls
//! `ringcast_fuzz::<name>`). They reach the engine only through `ringcast::fuzzing` and public
//! crate APIs. Besides "never panics", each checks what is certain about its parser; a failed
//! check is a panic, which libFuzzer reports as a crash.

mod update_model;

use bytes::BytesMut;
use ringcast::fuzzing::{self, TelemetryFrame, UpgradeOutcome, WorkerFrame};
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

/// HTTP-invoked functions: a registration's `invocation` object (after the first byte) and an
/// answer (status from the first two bytes, body after them) never panic; a 2xx without a body
/// is a success without a result, a status of 400 or more an error; a registration that passes
/// calls an http(s) URL.
pub fn http_function(data: &[u8]) {
    let env = |key: &str| (key.len() % 2 == 0).then(|| format!("secret-{key}"));
    match fuzzing::http_function_registration(data.get(1..).unwrap_or_default(), env) {
        Ok(scheme) => assert!(scheme == "http" || scheme == "https", "accepted a {scheme:?} URL"),
        Err(code) => assert!(!code.starts_with("accepted"), "{code}"),
    }
    let Some((head, body)) = data.split_first_chunk::<2>() else { return };
    let status = u16::from_be_bytes(*head) % 600;
    let outcome = fuzzing::http_function_answer(status, body);
    if (200..300).contains(&status) && body.is_empty() {
        assert_eq!(outcome, Ok(None));
    }
    if status >= 400 {
        assert!(outcome.is_err(), "HTTP {status} gave {outcome:?}");
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

/// A worker telemetry frame (`/otel`): the first byte picks the line limit, the rest is the
/// frame. Besides never panicking: every rendered message and data field keeps at most the limit
/// (plus the `…[+N bytes]` marker of a cut) and has no control character left (a worker cannot
/// forge engine log lines), and a trace id is 32 lowercase hex digits.
pub fn telemetry_frame(data: &[u8]) {
    let Some((&limit, frame)) = data.split_first() else { return };
    let limit = usize::from(limit);
    if let TelemetryFrame::Logs(lines) = fuzzing::telemetry_frame(frame, limit) {
        for line in lines {
            check_clipped(&line.message, limit);
            if let Some(data) = &line.data {
                check_clipped(data, limit.saturating_sub(line.message.len()));
            }
            if let Some(id) = &line.trace_id {
                assert!(id.len() == 32 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{id:?}");
            }
        }
    }
    // The same bytes with each prefix: every decoder sees every input.
    for prefix in [b"OTLP", b"MTRC", b"LOGS"] {
        let mut prefixed = prefix.to_vec();
        prefixed.extend_from_slice(frame);
        assert!(!matches!(fuzzing::telemetry_frame(&prefixed, limit), TelemetryFrame::NotTelemetry));
    }
}

fn check_clipped(text: &str, limit: usize) {
    assert!(!text.chars().any(char::is_control), "control character left in {text:?}");
    let kept = match text.rfind("…[+") {
        Some(at) if text.ends_with(" bytes]") => &text[..at],
        _ => text,
    };
    assert!(kept.len() <= limit, "{} bytes kept over a limit of {limit}: {text:?}", kept.len());
}

/// Longest pattern and value `rbac_rules` compares with its model (the model is quadratic).
const RBAC_MAX_CHARS: usize = 64;

/// RBAC `expose_functions` rules: `pattern\nvalue\nrule-json`. The glob matcher must agree with
/// a plain dynamic-programming model of anchored `*` globs; a rule read from any JSON must not
/// panic when applied, and must read back as itself from its own serialisation.
pub fn rbac_rules(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.splitn(3, '\n');
    let pattern: String = lines.next().unwrap_or_default().chars().take(RBAC_MAX_CHARS).collect();
    let value: String = lines.next().unwrap_or_default().chars().take(RBAC_MAX_CHARS).collect();
    let rule = lines.next().unwrap_or_default();
    assert_eq!(
        fuzzing::rbac_glob(&pattern, &value),
        glob_model(&pattern, &value),
        "glob {pattern:?} against {value:?}"
    );
    let metadata = serde_json::json!({ "public": true, "name": value });
    for namespace in ["default", "other"] {
        if let Some((_, round_trips)) = fuzzing::rbac_rule(rule.as_bytes(), &value, namespace, Some(&metadata)) {
            assert!(round_trips, "rule {rule:?} does not read back as itself");
        }
    }
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

/// `matches[i][j]`: the first `i` pattern chars match the first `j` value chars.
fn glob_model(pattern: &str, value: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let v: Vec<char> = value.chars().collect();
    let mut matches = vec![vec![false; v.len() + 1]; p.len() + 1];
    matches[0][0] = true;
    for i in 1..=p.len() {
        for j in 0..=v.len() {
            matches[i][j] = if p[i - 1] == '*' {
                matches[i - 1][j] || (j > 0 && matches[i][j - 1])
            } else {
                j > 0 && p[i - 1] == v[j - 1] && matches[i - 1][j - 1]
            };
        }
    }
    matches[p.len()][v.len()]
}

/// The channel endpoint's request target parser, and the worker port's request-line test that
/// routes connections to the channels executor. The first byte picks: 0..=127 the request
/// target, else the first bytes of a connection.
pub fn channel_request(data: &[u8]) {
    use ringcast::channels::request::{Peeked, RequestError, PATH_PREFIX, REQUEST_LINE_PREFIX};
    use ringcast_shards::subscriber::upgrade::percent_decode;
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode >= 128 {
        match fuzzing::channel_request_line(rest) {
            Peeked::Channel => assert!(rest.starts_with(REQUEST_LINE_PREFIX)),
            Peeked::Undecided => assert!(rest.len() < REQUEST_LINE_PREFIX.len() && REQUEST_LINE_PREFIX.starts_with(rest)),
            Peeked::Other => assert!(!rest.starts_with(REQUEST_LINE_PREFIX) && !REQUEST_LINE_PREFIX.starts_with(rest)),
        }
        return;
    }
    let Ok(target) = std::str::from_utf8(rest) else { return };
    match fuzzing::channel_request(target) {
        Ok(request) => {
            assert!(target.starts_with(PATH_PREFIX), "accepted {target:?}");
            assert!(!request.channel_id.is_empty(), "empty channel id from {target:?}");
            // The oracle: the first `key` and `dir` parameters (a name without `=` has an
            // empty value), form-decoded, are what the parser returned.
            let query = target.split_once('?').map(|(_, q)| q).unwrap_or_default();
            let first = |name: &str| {
                let raw = query.split('&').find_map(|p| match p.split_once('=') {
                    Some((n, v)) if n == name => Some(v),
                    None if p == name => Some(""),
                    _ => None,
                });
                raw.and_then(|v| percent_decode(&v.replace('+', " ")))
            };
            assert_eq!(first("dir").as_deref(), Some(request.dir.as_str()), "direction of {query:?}");
            assert_eq!(first("key").as_deref(), Some(request.key.as_str()), "key of {query:?}");
        }
        Err(RequestError::NotFound) => {}
        Err(e) => assert!(target.starts_with(PATH_PREFIX), "{e} for a path outside the endpoint: {target:?}"),
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
