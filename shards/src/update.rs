//! The operations of `stream::update` (spec §3): decoding the `ops` array and applying it to an
//! item's value.
//!
//! Applying never fails as a whole: an op that fails validation or meets a value of the wrong type
//! is skipped and reported as an [`OpError`], later ops still run, and the caller writes the
//! resulting value back either way.

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};
use std::fmt;

/// Most segments a path may have.
const MAX_PATH_DEPTH: usize = 32;
/// Longest path segment, in bytes.
const MAX_SEGMENT_BYTES: usize = 256;
/// Deepest nesting allowed in a merge value (each object/array level counts 1).
const MAX_VALUE_DEPTH: usize = 16;
/// Most top-level keys a merge value may have.
const MAX_VALUE_KEYS: usize = 1024;
/// Names rejected as path segments and as merge-value keys: JavaScript consumers that spread the
/// stored JSON into objects would otherwise reach the prototype chain through them.
const PROTO_KEYS: [&str; 3] = ["__proto__", "constructor", "prototype"];
/// Deepest document (1 per object/array level, as [`depth`] counts) a stored value may be: the
/// most serde_json reads back (its parser stops at 128 levels, counting from 1 at the root,
/// and refuses the 128th). A write whose resulting document is deeper is refused, so that every
/// stored value reads back as itself.
pub const MAX_DOCUMENT_DEPTH: usize = 127;
/// Where every error entry points its reader.
pub const DOC_URL: &str = "https://iii.dev/docs/workers/iii-state#error-codes";

/// One operation of `stream::update`, as sent on the wire (tagged by a lower-case `type`).
///
/// The single-key ops (`set`, `increment`, `decrement`, `remove`) take one literal key, `""`
/// meaning the whole value. `merge` and `append` take a list of literal segments, empty meaning
/// the whole value. Dots are never separators.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum UpdateOp {
    Set {
        path: String,
        /// Absent and `null` both store JSON `null`.
        #[serde(default)]
        value: Value,
    },
    Merge {
        #[serde(default, deserialize_with = "segments")]
        path: Vec<String>,
        #[serde(default)]
        value: Value,
    },
    Increment {
        path: String,
        by: i64,
    },
    Decrement {
        path: String,
        by: i64,
    },
    Append {
        #[serde(default, deserialize_with = "segments")]
        path: Vec<String>,
        #[serde(default)]
        value: Value,
    },
    Remove {
        path: String,
    },
}

impl UpdateOp {
    /// The wire name, which prefixes the op's error codes.
    pub fn name(&self) -> &'static str {
        match self {
            UpdateOp::Set { .. } => "set",
            UpdateOp::Merge { .. } => "merge",
            UpdateOp::Increment { .. } => "increment",
            UpdateOp::Decrement { .. } => "decrement",
            UpdateOp::Append { .. } => "append",
            UpdateOp::Remove { .. } => "remove",
        }
    }
}

/// Decodes a merge/append `path`: `null`/`""`/`[]` are the root, a string is one literal segment,
/// an array of strings is the segment list (its empty strings are kept so validation reports them).
fn segments<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    struct Segments;

    impl<'de> Visitor<'de> for Segments {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string or an array of strings")
        }

        fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
            Ok(if s.is_empty() {
                Vec::new()
            } else {
                vec![s.to_owned()]
            })
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_PATH_DEPTH + 1));
            while let Some(segment) = seq.next_element::<String>()? {
                out.push(segment);
            }
            Ok(out)
        }
    }

    deserializer.deserialize_any(Segments)
}

/// Decodes the request's `ops`. An `Err` (not an array, unknown `type`, non-integer or missing
/// `by`, array `path` on a single-key op, missing `path`, …) fails the whole call as a
/// `deserialization_error`; the message says what was wrong.
pub fn parse_ops(ops: &Value) -> Result<Vec<UpdateOp>, String> {
    Vec::<UpdateOp>::deserialize(ops).map_err(|e| e.to_string())
}

/// A skipped op, as reported in the `errors` array of the `stream::update` result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpError {
    /// 0-based position of the op in the request's `ops`.
    pub op_index: usize,
    pub code: String,
    pub message: String,
    pub doc_url: String,
}

/// Why one op was skipped: the code's suffix after `<op>.` and the message.
struct Failure {
    suffix: &'static str,
    message: String,
}

fn fail(suffix: &'static str, message: String) -> Result<(), Failure> {
    Err(Failure { suffix, message })
}

/// Applies `ops` in order to `current` (`None` = the item does not exist) and returns the new value
/// and one error entry per skipped op. A missing item starts as `{}`; it is still treated as
/// missing by root `increment`/`decrement`/`append` until some op succeeds.
pub fn apply(current: Option<&Value>, ops: &[UpdateOp]) -> (Value, Vec<OpError>) {
    let mut missing = current.is_none();
    // While `missing` holds, `doc` is still the untouched `{}`: only successful ops change it.
    let mut doc = current.cloned().unwrap_or_else(|| Value::Object(Map::new()));
    let mut errors = Vec::new();
    for (op_index, op) in ops.iter().enumerate() {
        match apply_one(&mut doc, missing, op) {
            Ok(()) => missing = false,
            Err(Failure { suffix, message }) => errors.push(OpError {
                op_index,
                code: format!("{}.{}", op.name(), suffix),
                message,
                doc_url: DOC_URL.to_owned(),
            }),
        }
    }
    (doc, errors)
}

fn apply_one(doc: &mut Value, missing: bool, op: &UpdateOp) -> Result<(), Failure> {
    match op {
        UpdateOp::Set { path, value } => {
            validate_path(key_segments(path))?;
            if path.is_empty() {
                *doc = value.clone();
                return Ok(());
            }
            let Value::Object(map) = doc else {
                return not_object("set", path, doc);
            };
            map.insert(path.clone(), value.clone());
            Ok(())
        }
        UpdateOp::Merge { path, value } => {
            validate_path(path)?;
            let entries = validate_merge_value(value)?;
            let target = if path.is_empty() {
                // A root merge onto a non-object is silently a no-op (reference behaviour).
                let Value::Object(map) = doc else { return Ok(()) };
                map
            } else {
                walk_or_create(doc, path)
            };
            for (k, v) in entries {
                target.insert(k.clone(), v.clone());
            }
            Ok(())
        }
        UpdateOp::Increment { path, by } => add(doc, missing, path, i128::from(*by), "increment"),
        UpdateOp::Decrement { path, by } => add(doc, missing, path, -i128::from(*by), "decrement"),
        UpdateOp::Append { path, value } => {
            validate_path(path)?;
            let (leaf, parents) = match path.split_last() {
                None => {
                    if missing {
                        *doc = Value::Null;
                    }
                    return append_to(doc, value, path);
                }
                Some(split) => split,
            };
            // Checked before creating intermediates, so a failing op leaves the root untouched.
            if !doc.is_object() {
                return not_object("append", &label(path), doc);
            }
            let parent = walk_or_create(doc, parents);
            match parent.get_mut(leaf) {
                Some(existing) => append_to(existing, value, path),
                None => {
                    // A missing single key starts as the value itself if it is a string (so
                    // repeated appends concatenate); a missing nested leaf is always a list.
                    let initial = if parents.is_empty() {
                        initial_append(value)
                    } else {
                        Value::Array(vec![value.clone()])
                    };
                    parent.insert(leaf.clone(), initial);
                    Ok(())
                }
            }
        }
        UpdateOp::Remove { path } => {
            validate_path(key_segments(path))?;
            if path.is_empty() {
                // The item keeps existing, holding `null`.
                *doc = Value::Null;
                return Ok(());
            }
            let Value::Object(map) = doc else {
                return not_object("remove", path, doc);
            };
            map.remove(path);
            Ok(())
        }
    }
}

/// `increment` (`delta = by`) and `decrement` (`delta = -by`) on a single key or the root.
fn add(doc: &mut Value, missing: bool, path: &String, delta: i128, op: &str) -> Result<(), Failure> {
    validate_path(key_segments(path))?;
    let target = if path.is_empty() {
        if missing {
            *doc = int_value(delta).expect("-i64::MIN fits in u64");
            return Ok(());
        }
        doc
    } else {
        let Value::Object(map) = doc else {
            return not_object(op, path, doc);
        };
        if !map.contains_key(path) {
            map.insert(path.to_owned(), int_value(delta).expect("-i64::MIN fits in u64"));
            return Ok(());
        }
        map.get_mut(path).expect("key just checked")
    };
    match add_number(target, delta) {
        Some(sum) => {
            *target = sum;
            Ok(())
        }
        None => fail(
            "not_number",
            format!(
                "Expected number at path '{}', got {}.",
                key_label(path),
                type_name(target)
            ),
        ),
    }
}

/// `value + delta` if `value` is a number and the result is representable: integers stay integers
/// (i64, or u64 above `i64::MAX`), floats stay floats and must remain finite.
fn add_number(value: &Value, delta: i128) -> Option<Value> {
    let Value::Number(n) = value else { return None };
    if let Some(i) = n.as_i64() {
        int_value(i128::from(i) + delta)
    } else if let Some(u) = n.as_u64() {
        int_value(i128::from(u) + delta)
    } else {
        Number::from_f64(n.as_f64()? + delta as f64).map(Value::Number)
    }
}

fn int_value(v: i128) -> Option<Value> {
    if let Ok(i) = i64::try_from(v) {
        Some(Value::from(i))
    } else {
        u64::try_from(v).ok().map(Value::from)
    }
}

/// The append target rules: push onto an array, concatenate strings, fill a `null`.
fn append_to(target: &mut Value, value: &Value, path: &[String]) -> Result<(), Failure> {
    match target {
        Value::Array(items) => items.push(value.clone()),
        Value::String(s) => match value {
            Value::String(chunk) => s.push_str(chunk),
            other => {
                return fail(
                    "type_mismatch",
                    format!(
                        "Expected string append value at path '{}', got {}.",
                        label(path),
                        type_name(other)
                    ),
                )
            }
        },
        Value::Null => *target = initial_append(value),
        other => {
            return fail(
                "type_mismatch",
                format!(
                    "Cannot append at path '{}': target is {}, expected array, string, null, or \
                     missing field.",
                    label(path),
                    type_name(other)
                ),
            )
        }
    }
    Ok(())
}

/// What appending `value` to nothing gives: a string stays a string, anything else is wrapped.
fn initial_append(value: &Value) -> Value {
    match value {
        Value::String(_) => value.clone(),
        _ => Value::Array(vec![value.clone()]),
    }
}

/// Descends `segments` from `doc`, turning `doc` and every missing or non-object step into `{}`,
/// and returns the object at the end (RFC 7396-style auto-vivification for nested merge/append).
fn walk_or_create<'a>(doc: &'a mut Value, segments: &[String]) -> &'a mut Map<String, Value> {
    let mut node = force_object(doc);
    for segment in segments {
        let child = node
            .entry(segment.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        node = force_object(child);
    }
    node
}

fn force_object(value: &mut Value) -> &mut Map<String, Value> {
    if !value.is_object() {
        *value = Value::Object(Map::new());
    }
    match value {
        Value::Object(map) => map,
        _ => unreachable!("just made an object"),
    }
}

/// The segments of a single-key op's path: none for `""` (the root), else the key itself.
fn key_segments(path: &String) -> &[String] {
    if path.is_empty() {
        &[]
    } else {
        std::slice::from_ref(path)
    }
}

/// Path validation shared by every op (spec §3.4); the first failing check wins.
fn validate_path(segments: &[String]) -> Result<(), Failure> {
    if segments.len() > MAX_PATH_DEPTH {
        return fail(
            "path.too_deep",
            format!(
                "Path depth {} exceeds maximum of {MAX_PATH_DEPTH}",
                segments.len()
            ),
        );
    }
    for segment in segments {
        if segment.is_empty() {
            return fail("path.empty_segment", "Path contains an empty segment".to_owned());
        }
        if segment.len() > MAX_SEGMENT_BYTES {
            return fail(
                "path.segment_too_long",
                format!(
                    "Path segment of {} bytes exceeds maximum of {MAX_SEGMENT_BYTES}",
                    segment.len()
                ),
            );
        }
        if PROTO_KEYS.contains(&segment.as_str()) {
            return fail(
                "path.proto_polluted",
                format!("Path segment '{segment}' is not allowed (prototype pollution)."),
            );
        }
    }
    Ok(())
}

/// Checks a merge value (spec §3.3, first failure wins) and returns its entries.
fn validate_merge_value(value: &Value) -> Result<&Map<String, Value>, Failure> {
    let Value::Object(map) = value else {
        return Err(Failure {
            suffix: "value.not_an_object",
            message: "Merge value must be a JSON object".to_owned(),
        });
    };
    if map.len() > MAX_VALUE_KEYS {
        return Err(Failure {
            suffix: "value.too_many_keys",
            message: format!(
                "Merge value has {} top-level keys, exceeds maximum of {MAX_VALUE_KEYS}",
                map.len()
            ),
        });
    }
    if let Some(key) = map.keys().find(|k| PROTO_KEYS.contains(&k.as_str())) {
        return Err(Failure {
            suffix: "value.proto_polluted",
            message: format!("Merge value top-level key \"{key}\" is a prototype-pollution sink"),
        });
    }
    let depth = depth(value);
    if depth > MAX_VALUE_DEPTH {
        return Err(Failure {
            suffix: "value.too_deep",
            message: format!("Merge value JSON nesting depth {depth} exceeds maximum of {MAX_VALUE_DEPTH}"),
        });
    }
    Ok(map)
}

/// Nesting depth: 1 per object/array level, scalars 0 (so `{}` is 1 and `{"a":[1]}` is 2).
/// Recursive: call it on parsed values (serde_json bounds them) or documents built from them
/// by [`apply`] (a path adds at most `MAX_PATH_DEPTH + 1` levels per op, never compounding).
pub fn depth(value: &Value) -> usize {
    match value {
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn not_object(op: &str, label: &str, target: &Value) -> Result<(), Failure> {
    fail(
        "target_not_object",
        format!(
            "Cannot {op} at path '{label}': target is {}, expected object.",
            type_name(target)
        ),
    )
}

/// Label of a single-key path in messages: the key, or `root`.
fn key_label(path: &str) -> &str {
    if path.is_empty() {
        "root"
    } else {
        path
    }
}

/// Label of a segment path in messages: `root`, the key, or `[a, b]` (never dot-joined, since
/// dots are not separators).
fn label(segments: &[String]) -> String {
    match segments {
        [] => "root".to_owned(),
        [key] => key.clone(),
        _ => format!("[{}]", segments.join(", ")),
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn nested(levels: usize) -> Value {
        (0..levels).fold(json!(1), |inner, _| Value::Array(vec![inner]))
    }

    #[test]
    fn max_document_depth_is_what_serde_json_reads_back() {
        let at_limit = serde_json::to_string(&nested(MAX_DOCUMENT_DEPTH)).unwrap();
        assert_eq!(depth(&serde_json::from_str(&at_limit).unwrap()), MAX_DOCUMENT_DEPTH);
        let past = serde_json::to_string(&nested(MAX_DOCUMENT_DEPTH + 1)).unwrap();
        assert!(serde_json::from_str::<Value>(&past).is_err());
    }

    #[test]
    fn one_op_adds_a_bounded_number_of_levels() {
        // A nested append: the path's objects plus the list around the value.
        let path: Vec<String> = (0..MAX_PATH_DEPTH).map(|i| format!("k{i}")).collect();
        let (doc, errors) = apply(None, &[UpdateOp::Append { path, value: nested(10) }]);
        assert!(errors.is_empty());
        assert_eq!(depth(&doc), MAX_PATH_DEPTH + 1 + 10);
    }

    fn ops(v: Value) -> Vec<UpdateOp> {
        parse_ops(&v).expect("ops decode")
    }

    /// Applies wire-format ops and expects no errors.
    fn run(current: Option<Value>, v: Value) -> Value {
        let (out, errors) = apply(current.as_ref(), &ops(v));
        assert!(errors.is_empty(), "unexpected errors: {errors:?}");
        out
    }

    /// Applies one op expected to fail; returns the (unchanged) value and the single error.
    fn run_err(current: Option<Value>, op: Value) -> (Value, OpError) {
        let (out, mut errors) = apply(current.as_ref(), &ops(json!([op])));
        assert_eq!(errors.len(), 1, "expected one error, got {errors:?}");
        (out, errors.remove(0))
    }

    fn code_of(current: Value, op: Value) -> String {
        run_err(Some(current), op).1.code
    }

    // ---- decoding ----

    #[test]
    fn parses_every_op_kind() {
        let parsed = ops(json!([
            {"type":"set","path":"a","value":1},
            {"type":"set","path":"b"},
            {"type":"set","path":"c","value":null},
            {"type":"merge","value":{"x":1}},
            {"type":"merge","path":null,"value":{}},
            {"type":"merge","path":"","value":{}},
            {"type":"merge","path":[],"value":{}},
            {"type":"merge","path":"a.b","value":{}},
            {"type":"merge","path":["a","b"],"value":{}},
            {"type":"increment","path":"n","by":2},
            {"type":"decrement","path":"","by":-3},
            {"type":"append","path":["l",""],"value":"x"},
            {"type":"append","value":"x"},
            {"type":"remove","path":"k","extra":"ignored"},
        ]));
        let empty = Vec::<String>::new;
        assert_eq!(
            parsed,
            vec![
                UpdateOp::Set {
                    path: "a".into(),
                    value: json!(1)
                },
                UpdateOp::Set {
                    path: "b".into(),
                    value: Value::Null
                },
                UpdateOp::Set {
                    path: "c".into(),
                    value: Value::Null
                },
                UpdateOp::Merge {
                    path: empty(),
                    value: json!({"x":1})
                },
                UpdateOp::Merge {
                    path: empty(),
                    value: json!({})
                },
                UpdateOp::Merge {
                    path: empty(),
                    value: json!({})
                },
                UpdateOp::Merge {
                    path: empty(),
                    value: json!({})
                },
                UpdateOp::Merge {
                    path: vec!["a.b".into()],
                    value: json!({})
                },
                UpdateOp::Merge {
                    path: vec!["a".into(), "b".into()],
                    value: json!({})
                },
                UpdateOp::Increment {
                    path: "n".into(),
                    by: 2
                },
                UpdateOp::Decrement {
                    path: "".into(),
                    by: -3
                },
                UpdateOp::Append {
                    path: vec!["l".into(), "".into()],
                    value: json!("x")
                },
                UpdateOp::Append {
                    path: empty(),
                    value: json!("x")
                },
                UpdateOp::Remove { path: "k".into() },
            ]
        );
        assert_eq!(
            parsed.iter().map(UpdateOp::name).collect::<Vec<_>>()[..3],
            ["set"; 3]
        );
    }

    #[test]
    fn decoding_failures() {
        let bad = [
            json!({"type":"set","path":"a"}),
            json!(null),
            json!([{"type":"frobnicate","path":"a"}]),
            json!([{"path":"a","value":1}]),
            json!([{"type":"increment","path":"n","by":1.5}]),
            json!([{"type":"increment","path":"n","by":2.0}]),
            json!([{"type":"increment","path":"n"}]),
            json!([{"type":"decrement","path":"n","by":"1"}]),
            json!([{"type":"increment","path":"n","by":u64::MAX}]),
            json!([{"type":"set","path":["a"],"value":1}]),
            json!([{"type":"increment","path":["a"],"by":1}]),
            json!([{"type":"decrement","path":["a"],"by":1}]),
            json!([{"type":"remove","path":["a"]}]),
            json!([{"type":"set","value":1}]),
            json!([{"type":"remove"}]),
            json!([{"type":"remove","path":null}]),
            json!([{"type":"merge","path":["a",1],"value":{}}]),
            json!([{"type":"append","path":7,"value":1}]),
            json!([{"type":"SET","path":"a"}]),
            json!(["set"]),
        ];
        for v in bad {
            assert!(parse_ops(&v).is_err(), "should fail: {v}");
        }
        let msg = parse_ops(&json!([{"type":"increment","path":"n"}])).unwrap_err();
        assert!(msg.contains("by"), "{msg}");
    }

    #[test]
    fn empty_ops_list() {
        assert_eq!(ops(json!([])), vec![]);
        assert_eq!(run(None, json!([])), json!({}));
        assert_eq!(run(Some(json!(5)), json!([])), json!(5));
    }

    // ---- the spec example ----

    #[test]
    fn spec_example() {
        let out = run(
            Some(json!({"count":1})),
            json!([
                {"type":"increment","path":"count","by":1},
                {"type":"merge","path":["meta","last"],"value":{"by":"alice"}},
                {"type":"append","path":"log","value":"x"},
            ]),
        );
        assert_eq!(out, json!({"count":2,"log":"x","meta":{"last":{"by":"alice"}}}));
        assert_eq!(
            serde_json::to_string(&out).unwrap(),
            r#"{"count":2,"log":"x","meta":{"last":{"by":"alice"}}}"#
        );
    }

    // ---- execution model ----

    #[test]
    fn failing_ops_are_skipped_without_rollback() {
        let (out, errors) = apply(
            Some(&json!({"a":1,"s":"x"})),
            &ops(json!([
                {"type":"set","path":"b","value":2},
                {"type":"increment","path":"s","by":1},
                {"type":"set","path":"c","value":3},
                {"type":"merge","value":[]},
            ])),
        );
        assert_eq!(out, json!({"a":1,"b":2,"c":3,"s":"x"}));
        let idx: Vec<(usize, &str)> = errors.iter().map(|e| (e.op_index, e.code.as_str())).collect();
        assert_eq!(
            idx,
            [(1, "increment.not_number"), (3, "merge.value.not_an_object")]
        );
        assert!(errors.iter().all(|e| e.doc_url == DOC_URL));
    }

    #[test]
    fn error_entry_serializes_with_all_fields() {
        let (_, e) = run_err(
            Some(json!({})),
            json!({"type":"set","path":"__proto__","value":1}),
        );
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            json!({
                "op_index":0,
                "code":"set.path.proto_polluted",
                "message":"Path segment '__proto__' is not allowed (prototype pollution).",
                "doc_url":"https://iii.dev/docs/workers/iii-state#error-codes"
            })
        );
    }

    #[test]
    fn missing_item_with_only_failing_ops_stays_empty_object() {
        let (out, errors) = apply(None, &ops(json!([{"type":"merge","value":1}])));
        assert_eq!(out, json!({}));
        assert_eq!(errors.len(), 1);
    }

    #[test]
    fn input_value_is_not_mutated() {
        let before = json!({"a":1});
        let (out, _) = apply(Some(&before), &ops(json!([{"type":"set","path":"a","value":2}])));
        assert_eq!(before, json!({"a":1}));
        assert_eq!(out, json!({"a":2}));
    }

    // ---- set ----

    #[test]
    fn set_rules() {
        assert_eq!(
            run(
                Some(json!({"a":1})),
                json!([{"type":"set","path":"b","value":[1]}])
            ),
            json!({"a":1,"b":[1]})
        );
        assert_eq!(
            run(
                Some(json!({"a":1})),
                json!([{"type":"set","path":"a","value":{"x":1}}])
            ),
            json!({"a":{"x":1}})
        );
        assert_eq!(
            run(
                Some(json!({"a":1})),
                json!([{"type":"set","path":"a.b","value":1}])
            ),
            json!({"a":1,"a.b":1})
        );
        assert_eq!(
            run(Some(json!({"a":1})), json!([{"type":"set","path":"","value":7}])),
            json!(7)
        );
        assert_eq!(
            run(Some(json!({"a":1})), json!([{"type":"set","path":""}])),
            json!(null)
        );
        assert_eq!(
            run(Some(json!({})), json!([{"type":"set","path":"k"}])),
            json!({"k":null})
        );
        assert_eq!(
            run(None, json!([{"type":"set","path":"k","value":1}])),
            json!({"k":1})
        );
    }

    #[test]
    fn set_on_non_object() {
        for (current, ty) in [
            (json!(1), "number"),
            (json!("s"), "string"),
            (json!(null), "null"),
            (json!([]), "array"),
            (json!(true), "boolean"),
        ] {
            let (out, e) = run_err(Some(current.clone()), json!({"type":"set","path":"k","value":1}));
            assert_eq!(out, current);
            assert_eq!(e.code, "set.target_not_object");
            assert_eq!(
                e.message,
                format!("Cannot set at path 'k': target is {ty}, expected object.")
            );
        }
    }

    // ---- merge ----

    #[test]
    fn merge_root_is_shallow_and_keeps_siblings() {
        let out = run(
            Some(json!({"a":{"x":1},"b":2})),
            json!([{"type":"merge","value":{"a":{"y":2},"c":3}}]),
        );
        assert_eq!(out, json!({"a":{"y":2},"b":2,"c":3}));
        assert_eq!(
            run(None, json!([{"type":"merge","path":"","value":{"a":1}}])),
            json!({"a":1})
        );
        assert_eq!(
            run(None, json!([{"type":"merge","path":[],"value":{"a":1}}])),
            json!({"a":1})
        );
    }

    #[test]
    fn merge_root_on_non_object_silently_does_nothing() {
        for current in [json!(1), json!("s"), json!(null), json!([1])] {
            assert_eq!(
                run(Some(current.clone()), json!([{"type":"merge","value":{"a":1}}])),
                current
            );
        }
    }

    #[test]
    fn merge_nested_creates_and_replaces_intermediates() {
        let out = run(
            Some(json!({"a":{"b":{"keep":1}},"z":0})),
            json!([{"type":"merge","path":["a","b"],"value":{"n":2}}]),
        );
        assert_eq!(out, json!({"a":{"b":{"keep":1,"n":2}},"z":0}));
        for bad in [json!(null), json!(3), json!("s"), json!([1, 2])] {
            let out = run(
                Some(json!({"a":bad,"z":0})),
                json!([{"type":"merge","path":["a","b"],"value":{"n":1}}]),
            );
            assert_eq!(out, json!({"a":{"b":{"n":1}},"z":0}));
        }
        // The leaf itself is replaced too when it is not an object.
        assert_eq!(
            run(
                Some(json!({"a":5})),
                json!([{"type":"merge","path":"a","value":{"n":1}}])
            ),
            json!({"a":{"n":1}})
        );
        // A non-empty path replaces a non-object root (the scalar is lost).
        assert_eq!(
            run(
                Some(json!(42)),
                json!([{"type":"merge","path":"a","value":{"n":1}}])
            ),
            json!({"a":{"n":1}})
        );
        // A dotted string is one key.
        assert_eq!(
            run(None, json!([{"type":"merge","path":"a.b","value":{"n":1}}])),
            json!({"a.b":{"n":1}})
        );
        assert_eq!(
            run(None, json!([{"type":"merge","path":["a.b"],"value":{}}])),
            json!({"a.b":{}})
        );
    }

    #[test]
    fn merge_value_checks() {
        let (out, e) = run_err(Some(json!({"a":1})), json!({"type":"merge","value":[1]}));
        assert_eq!(out, json!({"a":1}));
        assert_eq!(
            (e.code.as_str(), e.message.as_str()),
            ("merge.value.not_an_object", "Merge value must be a JSON object")
        );
        assert_eq!(
            code_of(json!({}), json!({"type":"merge"})),
            "merge.value.not_an_object"
        );
        assert_eq!(
            code_of(json!({}), json!({"type":"merge","value":null})),
            "merge.value.not_an_object"
        );

        let many: Map<String, Value> = (0..1025).map(|i| (format!("k{i}"), json!(i))).collect();
        let (_, e) = run_err(Some(json!({})), json!({"type":"merge","value":many}));
        assert_eq!(e.code, "merge.value.too_many_keys");
        assert_eq!(
            e.message,
            "Merge value has 1025 top-level keys, exceeds maximum of 1024"
        );
        let ok: Map<String, Value> = (0..1024).map(|i| (format!("k{i}"), json!(i))).collect();
        assert_eq!(
            run(None, json!([{"type":"merge","value":ok}]))
                .as_object()
                .unwrap()
                .len(),
            1024
        );

        for key in PROTO_KEYS {
            let (_, e) = run_err(Some(json!({})), json!({"type":"merge","value":{"ok":1, key:1}}));
            assert_eq!(e.code, "merge.value.proto_polluted");
            assert_eq!(
                e.message,
                format!("Merge value top-level key \"{key}\" is a prototype-pollution sink")
            );
        }
        // Only top-level keys are checked.
        assert_eq!(
            run(None, json!([{"type":"merge","value":{"a":{"__proto__":1}}}])),
            json!({"a":{"__proto__":1}})
        );

        // Depth 16 is allowed, 17 is not ({} itself is depth 1).
        let nest = |levels: usize| (1..levels).fold(json!({}), |v, _| json!({"n": v}));
        assert_eq!(depth(&nest(16)), 16);
        run(None, json!([{"type":"merge","value":nest(16)}]));
        let (_, e) = run_err(Some(json!({})), json!({"type":"merge","value":nest(17)}));
        assert_eq!(e.code, "merge.value.too_deep");
        assert_eq!(
            e.message,
            "Merge value JSON nesting depth 17 exceeds maximum of 16"
        );
        // Arrays count as levels too.
        let arrays = (1..16).fold(json!([]), |v, _| json!([v]));
        let (_, e) = run_err(Some(json!({})), json!({"type":"merge","value":{"a":arrays}}));
        assert_eq!(e.code, "merge.value.too_deep");
    }

    #[test]
    fn merge_first_failing_check_wins() {
        // Path beats value.
        assert_eq!(
            code_of(json!({}), json!({"type":"merge","path":["a",""],"value":1})),
            "merge.path.empty_segment"
        );
        // Too many keys beats proto key and depth.
        let mut many: Map<String, Value> = (0..1025).map(|i| (format!("k{i}"), json!(i))).collect();
        many.insert("__proto__".into(), json!(1));
        assert_eq!(
            code_of(json!({}), json!({"type":"merge","value":many})),
            "merge.value.too_many_keys"
        );
        // Proto key beats depth.
        let deep = (1..20).fold(json!({}), |v, _| json!({"n": v}));
        assert_eq!(
            code_of(
                json!({}),
                json!({"type":"merge","value":{"prototype":1,"d":deep}})
            ),
            "merge.value.proto_polluted"
        );
        // Failed merges leave even a scalar root untouched.
        let (out, _) = run_err(Some(json!(3)), json!({"type":"merge","path":"a","value":[]}));
        assert_eq!(out, json!(3));
    }

    #[test]
    fn depth_definition() {
        assert_eq!(depth(&json!(1)), 0);
        assert_eq!(depth(&json!({})), 1);
        assert_eq!(depth(&json!([])), 1);
        assert_eq!(depth(&json!({"a":[1]})), 2);
        assert_eq!(depth(&json!({"a":1,"b":{"c":{}}})), 3);
    }

    // ---- increment / decrement ----

    #[test]
    fn increment_and_decrement_keys() {
        let out = run(
            Some(json!({"a":10,"f":1.5})),
            json!([
                {"type":"increment","path":"a","by":5},
                {"type":"decrement","path":"a","by":3},
                {"type":"increment","path":"m","by":4},
                {"type":"decrement","path":"d","by":4},
                {"type":"increment","path":"f","by":2},
                {"type":"decrement","path":"f","by":1},
                {"type":"increment","path":"z","by":0},
                {"type":"increment","path":"a.b","by":1},
            ]),
        );
        assert_eq!(out, json!({"a":12,"a.b":1,"d":-4,"f":2.5,"m":4,"z":0}));
    }

    #[test]
    fn increment_root() {
        assert_eq!(
            run(None, json!([{"type":"increment","path":"","by":5}])),
            json!(5)
        );
        assert_eq!(
            run(None, json!([{"type":"decrement","path":"","by":5}])),
            json!(-5)
        );
        assert_eq!(
            run(Some(json!(2)), json!([{"type":"increment","path":"","by":5}])),
            json!(7)
        );
        assert_eq!(
            run(Some(json!(2)), json!([{"type":"decrement","path":"","by":5}])),
            json!(-3)
        );
        assert_eq!(
            run(
                None,
                json!([{"type":"increment","path":"","by":1},{"type":"increment","path":"","by":1}])
            ),
            json!(2)
        );
        // An existing `{}` is not missing.
        let (_, e) = run_err(Some(json!({})), json!({"type":"increment","path":"","by":1}));
        assert_eq!(e.code, "increment.not_number");
        assert_eq!(e.message, "Expected number at path 'root', got object.");
        // Once an earlier op succeeded the item is no longer missing.
        let (out, errors) = apply(
            None,
            &ops(json!([{"type":"merge","value":{}},{"type":"decrement","path":"","by":1}])),
        );
        assert_eq!(out, json!({}));
        assert_eq!(errors[0].code, "decrement.not_number");
        // But a failed earlier op does not count.
        let (out, errors) = apply(
            None,
            &ops(json!([{"type":"merge","value":1},{"type":"increment","path":"","by":1}])),
        );
        assert_eq!(out, json!(1));
        assert_eq!(errors.len(), 1);
    }

    #[test]
    fn increment_not_number() {
        for (v, ty) in [
            (json!(null), "null"),
            (json!("1"), "string"),
            (json!(true), "boolean"),
            (json!([1]), "array"),
            (json!({}), "object"),
        ] {
            let (out, e) = run_err(
                Some(json!({"k": v.clone()})),
                json!({"type":"increment","path":"k","by":1}),
            );
            assert_eq!(out, json!({"k": v}));
            assert_eq!(e.code, "increment.not_number");
            assert_eq!(e.message, format!("Expected number at path 'k', got {ty}."));
            assert_eq!(
                code_of(
                    json!({"k": v.clone()}),
                    json!({"type":"decrement","path":"k","by":0})
                ),
                "decrement.not_number"
            );
        }
        assert_eq!(
            code_of(json!("s"), json!({"type":"decrement","path":"","by":1})),
            "decrement.not_number"
        );
    }

    #[test]
    fn increment_target_not_object() {
        for (v, ty) in [(json!(1), "number"), (json!(null), "null"), (json!([]), "array")] {
            let (out, e) = run_err(Some(v.clone()), json!({"type":"increment","path":"k","by":1}));
            assert_eq!(out, v);
            assert_eq!(e.code, "increment.target_not_object");
            assert_eq!(
                e.message,
                format!("Cannot increment at path 'k': target is {ty}, expected object.")
            );
            let (_, e) = run_err(Some(v.clone()), json!({"type":"decrement","path":"k","by":1}));
            assert_eq!(e.code, "decrement.target_not_object");
            assert_eq!(
                e.message,
                format!("Cannot decrement at path 'k': target is {ty}, expected object.")
            );
        }
    }

    #[test]
    fn integer_arithmetic_limits() {
        let max = i64::MAX;
        let min = i64::MIN;
        // Past i64::MAX the result continues as u64.
        assert_eq!(
            run(
                Some(json!({"k":max})),
                json!([{"type":"increment","path":"k","by":1}])
            ),
            json!({"k":(max as u64) + 1})
        );
        assert_eq!(
            run(
                Some(json!({"k":u64::MAX - 1})),
                json!([{"type":"increment","path":"k","by":1}])
            ),
            json!({"k":u64::MAX})
        );
        assert_eq!(
            run(
                Some(json!({"k":u64::MAX})),
                json!([{"type":"decrement","path":"k","by":1}])
            ),
            json!({"k":u64::MAX - 1})
        );
        // Back below i64::MAX it is an ordinary integer again.
        assert_eq!(
            run(
                Some(json!({"k":(max as u64) + 1})),
                json!([{"type":"decrement","path":"k","by":1}])
            ),
            json!({"k":max})
        );
        // Overflow is reported as not_number and leaves the value.
        let (out, e) = run_err(
            Some(json!({"k":u64::MAX})),
            json!({"type":"increment","path":"k","by":1}),
        );
        assert_eq!(out, json!({"k":u64::MAX}));
        assert_eq!(
            (e.code.as_str(), e.message.as_str()),
            ("increment.not_number", "Expected number at path 'k', got number.")
        );
        assert_eq!(
            code_of(json!({"k":min}), json!({"type":"decrement","path":"k","by":1})),
            "decrement.not_number"
        );
        assert_eq!(
            code_of(json!({"k":min}), json!({"type":"increment","path":"k","by":min})),
            "increment.not_number"
        );
        assert_eq!(
            code_of(json!(min), json!({"type":"decrement","path":"","by":max})),
            "decrement.not_number"
        );
        // Decrementing a missing key by i64::MIN gives 2^63.
        assert_eq!(
            run(None, json!([{"type":"decrement","path":"k","by":min}])),
            json!({"k":(max as u64) + 1})
        );
        assert_eq!(
            run(None, json!([{"type":"decrement","path":"","by":min}])),
            json!((max as u64) + 1)
        );
        assert_eq!(
            run(
                Some(json!({"k":min})),
                json!([{"type":"increment","path":"k","by":max}])
            ),
            json!({"k":-1})
        );
    }

    #[test]
    fn float_arithmetic() {
        let out = run(
            Some(json!({"k":0.5})),
            json!([{"type":"increment","path":"k","by":1}]),
        );
        assert_eq!(out, json!({"k":1.5}));
        assert!(out["k"].is_f64());
        // Stays a float even when the result is whole.
        let out = run(
            Some(json!({"k":0.5})),
            json!([{"type":"decrement","path":"k","by":-1}]),
        );
        assert!(out["k"].is_f64());
        assert_eq!(out["k"].as_f64(), Some(1.5));
        let out = run(Some(json!(2.5)), json!([{"type":"decrement","path":"","by":3}]));
        assert_eq!(out, json!(-0.5));
        // Adding an i64 to a finite float cannot reach infinity (it rounds back to f64::MAX), so
        // the non-finite branch is defensive only.
        let out = run(
            Some(json!(f64::MAX)),
            json!([{"type":"increment","path":"","by":i64::MAX}]),
        );
        assert_eq!(out, json!(f64::MAX));
    }

    // ---- append ----

    #[test]
    fn append_root() {
        assert_eq!(run(None, json!([{"type":"append","value":"hi"}])), json!("hi"));
        assert_eq!(
            run(None, json!([{"type":"append","path":"","value":{"k":1}}])),
            json!([{"k":1}])
        );
        assert_eq!(
            run(
                None,
                json!([{"type":"append","path":[],"value":1},{"type":"append","value":2}])
            ),
            json!([1, 2])
        );
        assert_eq!(
            run(
                None,
                json!([{"type":"append","value":"a"},{"type":"append","value":"b"}])
            ),
            json!("ab")
        );
        assert_eq!(
            run(Some(json!([1])), json!([{"type":"append","value":[2]}])),
            json!([1, [2]])
        );
        assert_eq!(
            run(Some(json!("a")), json!([{"type":"append","value":"b"}])),
            json!("ab")
        );
        assert_eq!(
            run(Some(json!(null)), json!([{"type":"append","value":"b"}])),
            json!("b")
        );
        assert_eq!(
            run(Some(json!(null)), json!([{"type":"append","value":null}])),
            json!([null])
        );
        // An existing `{}` is an object, not a missing item.
        let (out, e) = run_err(Some(json!({})), json!({"type":"append","value":1}));
        assert_eq!(out, json!({}));
        assert_eq!(e.code, "append.type_mismatch");
        assert_eq!(
            e.message,
            "Cannot append at path 'root': target is object, expected array, string, null, or missing field."
        );
    }

    #[test]
    fn append_single_segment() {
        let out = run(
            Some(json!({"arr":[1],"s":"a","n":null})),
            json!([
                {"type":"append","path":"arr","value":2},
                {"type":"append","path":["s"],"value":"b"},
                {"type":"append","path":"n","value":3},
                {"type":"append","path":"new_s","value":"x"},
                {"type":"append","path":"new_a","value":{"k":1}},
                {"type":"append","path":"a.b","value":1},
            ]),
        );
        assert_eq!(
            out,
            json!({"a.b":[1],"arr":[1,2],"n":[3],"new_a":[{"k":1}],"new_s":"x","s":"ab"})
        );
    }

    #[test]
    fn append_nested() {
        let out = run(
            Some(json!({"a":{"s":"x","l":[0],"n":null},"b":5})),
            json!([
                {"type":"append","path":["a","s"],"value":"y"},
                {"type":"append","path":["a","l"],"value":1},
                {"type":"append","path":["a","n"],"value":"z"},
                {"type":"append","path":["a","new"],"value":"str"},
                {"type":"append","path":["b","c","d"],"value":1},
                {"type":"append","path":["x","y"],"value":true},
            ]),
        );
        assert_eq!(
            out,
            json!({"a":{"l":[0,1],"n":"z","new":["str"],"s":"xy"},"b":{"c":{"d":[1]}},"x":{"y":[true]}})
        );
    }

    #[test]
    fn append_type_mismatch() {
        for (v, ty) in [
            (json!({}), "object"),
            (json!(1), "number"),
            (json!(false), "boolean"),
        ] {
            let (out, e) = run_err(
                Some(json!({"k": v.clone()})),
                json!({"type":"append","path":"k","value":[1]}),
            );
            assert_eq!(out, json!({"k": v}));
            assert_eq!(e.code, "append.type_mismatch");
            assert_eq!(e.message, format!("Cannot append at path 'k': target is {ty}, expected array, string, null, or missing field."));
        }
        for (v, ty) in [
            (json!(1), "number"),
            (json!(null), "null"),
            (json!([]), "array"),
            (json!({}), "object"),
            (json!(true), "boolean"),
        ] {
            let (out, e) = run_err(
                Some(json!({"k":"s"})),
                json!({"type":"append","path":"k","value":v}),
            );
            assert_eq!(out, json!({"k":"s"}));
            assert_eq!(e.code, "append.type_mismatch");
            assert_eq!(
                e.message,
                format!("Expected string append value at path 'k', got {ty}.")
            );
        }
        let (_, e) = run_err(
            Some(json!({"a":{"b":"s"}})),
            json!({"type":"append","path":["a","b"],"value":1}),
        );
        assert_eq!(
            e.message,
            "Expected string append value at path '[a, b]', got number."
        );
        let (_, e) = run_err(Some(json!("s")), json!({"type":"append","value":2}));
        assert_eq!(
            e.message,
            "Expected string append value at path 'root', got number."
        );
    }

    #[test]
    fn append_target_not_object_leaves_root_untouched() {
        for (v, ty) in [
            (json!(1), "number"),
            (json!("s"), "string"),
            (json!(null), "null"),
            (json!([1]), "array"),
        ] {
            let (out, e) = run_err(Some(v.clone()), json!({"type":"append","path":"k","value":1}));
            assert_eq!(out, v);
            assert_eq!(e.code, "append.target_not_object");
            assert_eq!(
                e.message,
                format!("Cannot append at path 'k': target is {ty}, expected object.")
            );
            let (out, e) = run_err(
                Some(v.clone()),
                json!({"type":"append","path":["a","b"],"value":1}),
            );
            assert_eq!(out, v);
            assert_eq!(
                e.message,
                format!("Cannot append at path '[a, b]': target is {ty}, expected object.")
            );
        }
    }

    #[test]
    fn append_nested_onto_object_leaf_is_a_mismatch() {
        let (out, e) = run_err(
            Some(json!({"a":1,"b":{"c":{}}})),
            json!({"type":"append","path":["b","c"],"value":1}),
        );
        assert_eq!(e.code, "append.type_mismatch");
        assert_eq!(out, json!({"a":1,"b":{"c":{}}}));
    }

    // ---- remove ----

    #[test]
    fn remove_rules() {
        assert_eq!(
            run(Some(json!({"a":1,"b":2})), json!([{"type":"remove","path":"a"}])),
            json!({"b":2})
        );
        assert_eq!(
            run(Some(json!({"a":1})), json!([{"type":"remove","path":"zz"}])),
            json!({"a":1})
        );
        assert_eq!(
            run(
                Some(json!({"a.b":1,"a":{"b":2}})),
                json!([{"type":"remove","path":"a.b"}])
            ),
            json!({"a":{"b":2}})
        );
        assert_eq!(
            run(Some(json!({"a":1})), json!([{"type":"remove","path":""}])),
            json!(null)
        );
        assert_eq!(run(None, json!([{"type":"remove","path":""}])), json!(null));
        for (v, ty) in [
            (json!(1), "number"),
            (json!(null), "null"),
            (json!([]), "array"),
            (json!("s"), "string"),
        ] {
            let (out, e) = run_err(Some(v.clone()), json!({"type":"remove","path":"k"}));
            assert_eq!(out, v);
            assert_eq!(e.code, "remove.target_not_object");
            assert_eq!(
                e.message,
                format!("Cannot remove at path 'k': target is {ty}, expected object.")
            );
        }
    }

    // ---- path validation ----

    #[test]
    fn path_errors_for_single_key_ops() {
        let long = "x".repeat(257);
        for op in ["set", "increment", "decrement", "remove"] {
            let with = |path: &str| json!({"type":op,"path":path,"value":1,"by":1});
            for key in PROTO_KEYS {
                let (out, e) = run_err(Some(json!({"a":1})), with(key));
                assert_eq!(out, json!({"a":1}));
                assert_eq!(e.code, format!("{op}.path.proto_polluted"));
                assert_eq!(
                    e.message,
                    format!("Path segment '{key}' is not allowed (prototype pollution).")
                );
            }
            let (_, e) = run_err(Some(json!({})), with(&long));
            assert_eq!(e.code, format!("{op}.path.segment_too_long"));
            assert_eq!(e.message, "Path segment of 257 bytes exceeds maximum of 256");
            // 256 bytes is fine; the limit is bytes, not characters.
            assert!(apply(Some(&json!({})), &ops(json!([with(&"x".repeat(256))])))
                .1
                .is_empty());
            assert_eq!(
                code_of(json!({}), with(&"é".repeat(129))),
                format!("{op}.path.segment_too_long")
            );
            // Near-misses of the proto names are ordinary keys.
            assert!(apply(
                Some(&json!({})),
                &ops(json!([with("__proto"), with("Constructor")]))
            )
            .1
            .is_empty());
        }
    }

    #[test]
    fn path_errors_for_segment_ops() {
        for op in ["merge", "append"] {
            let with = |path: Value| json!({"type":op,"path":path,"value":{}});
            let segs = |n: usize| Value::from((0..n).map(|i| format!("s{i}")).collect::<Vec<_>>());

            let (out, e) = run_err(Some(json!({"a":1})), with(segs(33)));
            assert_eq!(out, json!({"a":1}));
            assert_eq!(e.code, format!("{op}.path.too_deep"));
            assert_eq!(e.message, "Path depth 33 exceeds maximum of 32");
            assert!(apply(None, &ops(json!([with(segs(32))]))).1.is_empty());

            let (_, e) = run_err(Some(json!({})), with(json!(["a", ""])));
            assert_eq!(e.code, format!("{op}.path.empty_segment"));
            assert_eq!(e.message, "Path contains an empty segment");
            assert_eq!(
                code_of(json!({}), with(json!([""]))),
                format!("{op}.path.empty_segment")
            );

            let (_, e) = run_err(Some(json!({})), with(json!(["a", "y".repeat(300)])));
            assert_eq!(e.code, format!("{op}.path.segment_too_long"));
            assert_eq!(e.message, "Path segment of 300 bytes exceeds maximum of 256");
            assert_eq!(
                code_of(json!({}), with(json!("y".repeat(257)))),
                format!("{op}.path.segment_too_long")
            );

            for key in PROTO_KEYS {
                assert_eq!(
                    code_of(json!({}), with(json!(["ok", key]))),
                    format!("{op}.path.proto_polluted")
                );
                assert_eq!(
                    code_of(json!({}), with(json!(key))),
                    format!("{op}.path.proto_polluted")
                );
            }
        }
    }

    #[test]
    fn path_checks_run_in_order() {
        let mut many: Vec<String> = vec!["__proto__".into(), "".into(), "z".repeat(300)];
        many.extend((0..30).map(|i| i.to_string()));
        let with = |path: Vec<String>| json!({"type":"append","path":path,"value":1});
        assert_eq!(code_of(json!({}), with(many.clone())), "append.path.too_deep");
        many.truncate(32);
        // Checks go segment by segment: the first bad segment decides.
        assert_eq!(
            code_of(json!({}), with(many.clone())),
            "append.path.proto_polluted"
        );
        assert_eq!(
            code_of(json!({}), with(many[1..].to_vec())),
            "append.path.empty_segment"
        );
        assert_eq!(
            code_of(json!({}), with(many[2..].to_vec())),
            "append.path.segment_too_long"
        );
    }

    #[test]
    fn labels() {
        assert_eq!(label(&[]), "root");
        assert_eq!(label(&["a.b".into()]), "a.b");
        assert_eq!(label(&["a".into(), "b".into()]), "[a, b]");
        assert_eq!(key_label(""), "root");
        assert_eq!(key_label("k"), "k");
    }

    // ---- property ----

    proptest::proptest! {
        /// Any sequence of plain-key `set`s on `{}` gives the object a map model predicts.
        #[test]
        fn set_sequence_matches_model(
            steps in proptest::collection::vec(
                (proptest::sample::select(vec!["a", "b", "c", "d", "e", "a.b", "k 1", "ü"]), proptest::num::i64::ANY),
                0..40,
            )
        ) {
            let wire: Vec<Value> = steps.iter().map(|(k, v)| json!({"type":"set","path":k,"value":v})).collect();
            let (out, errors) = apply(Some(&json!({})), &ops(Value::from(wire)));
            proptest::prop_assert!(errors.is_empty());
            let mut model = std::collections::HashMap::new();
            for (k, v) in &steps {
                model.insert(k.to_string(), json!(v));
            }
            let got: std::collections::HashMap<String, Value> =
                out.as_object().expect("an object").clone().into_iter().collect();
            proptest::prop_assert_eq!(got, model);
        }
    }
}
