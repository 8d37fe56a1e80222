//! The `update_ops` target: arbitrary op lists (built with `arbitrary`, sent through the wire
//! decoding `parse_ops`) applied by `ringcast_shards::update::apply` and by the model below,
//! written from spec/stream.md §3 and not from the implementation. The resulting value, and the
//! `op_index` and `code` of every error entry, must agree.

use arbitrary::{Arbitrary, Unstructured};
use ringcast_shards::update::{self, DOC_URL};
use serde_json::{json, Map, Number, Value};

const MAX_PATH_DEPTH: usize = 32;
const MAX_SEGMENT_BYTES: usize = 256;
const MAX_VALUE_DEPTH: usize = 16;
const MAX_VALUE_KEYS: usize = 1024;
const PROTO_KEYS: [&str; 3] = ["__proto__", "constructor", "prototype"];
/// Deepest generated value: past `MAX_VALUE_DEPTH`, so the depth check is reached.
const MAX_GEN_DEPTH: usize = 18;

/// Keys from a small set, so that ops meet each other's keys, plus the edge cases of §3.4.
#[derive(Arbitrary, Debug, Clone)]
enum Key {
    A,
    B,
    C,
    Dotted,
    Empty,
    Proto,
    Constructor,
    Prototype,
    Longest,
    TooLong,
    Other(String),
}

impl Key {
    fn text(&self) -> String {
        match self {
            Key::A => "a".into(),
            Key::B => "b".into(),
            Key::C => "c".into(),
            Key::Dotted => "a.b".into(),
            Key::Empty => String::new(),
            Key::Proto => "__proto__".into(),
            Key::Constructor => "constructor".into(),
            Key::Prototype => "prototype".into(),
            Key::Longest => "x".repeat(MAX_SEGMENT_BYTES),
            Key::TooLong => "y".repeat(MAX_SEGMENT_BYTES + 1),
            Key::Other(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Val {
    Null,
    Bool(bool),
    Int(i64),
    Big(u64),
    Float(f64),
    Str(Key),
    Arr(Vec<Val>),
    Obj(Vec<(Key, Val)>),
    /// `levels` nested single-key objects: reaches the merge depth limit cheaply.
    Deep(u8),
}

impl Val {
    fn json(&self, depth: usize) -> Value {
        match self {
            Val::Null => Value::Null,
            Val::Bool(b) => Value::Bool(*b),
            Val::Int(i) => Value::from(*i),
            Val::Big(u) => Value::from(*u),
            Val::Float(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Val::Str(k) => Value::String(k.text()),
            _ if depth >= MAX_GEN_DEPTH => Value::Null,
            Val::Arr(items) => Value::Array(items.iter().map(|v| v.json(depth + 1)).collect()),
            Val::Obj(entries) => {
                Value::Object(entries.iter().map(|(k, v)| (k.text(), v.json(depth + 1))).collect())
            }
            Val::Deep(levels) => {
                let mut v = json!(1);
                for _ in 0..usize::from(*levels % 20) {
                    v = json!({ "d": v });
                }
                v
            }
        }
    }
}

/// A merge/append `path` as it may appear on the wire.
#[derive(Arbitrary, Debug)]
enum SegPath {
    Absent,
    Null,
    One(Key),
    List(Vec<Key>),
    /// Just past the depth limit, or at it.
    Deep(bool),
}

impl SegPath {
    fn wire(&self) -> Option<Value> {
        match self {
            SegPath::Absent => None,
            SegPath::Null => Some(Value::Null),
            SegPath::One(k) => Some(Value::String(k.text())),
            SegPath::List(keys) => Some(Value::Array(keys.iter().map(|k| Value::String(k.text())).collect())),
            SegPath::Deep(over) => {
                let n = MAX_PATH_DEPTH + usize::from(*over);
                Some(Value::Array((0..n).map(|i| Value::String(format!("k{}", i % 3))).collect()))
            }
        }
    }

    /// Segments per §3.1: absent, `null`, `""` and `[]` are the root; a string is one segment.
    fn segments(&self) -> Vec<String> {
        match self.wire() {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) if s.is_empty() => Vec::new(),
            Some(Value::String(s)) => vec![s],
            Some(Value::Array(items)) => items.into_iter().map(|v| v.as_str().unwrap_or_default().to_owned()).collect(),
            Some(_) => unreachable!("paths are strings or arrays"),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Set { path: Key, value: Option<Val> },
    Merge { path: SegPath, value: Val },
    Increment { path: Key, by: i64 },
    Decrement { path: Key, by: i64 },
    Append { path: SegPath, value: Val },
    Remove { path: Key },
}

impl Op {
    fn wire(&self) -> Value {
        let mut op = Map::new();
        let mut put = |k: &str, v: Value| {
            op.insert(k.to_owned(), v);
        };
        match self {
            Op::Set { path, value } => {
                put("type", json!("set"));
                put("path", Value::String(path.text()));
                if let Some(v) = value {
                    put("value", v.json(0));
                }
            }
            Op::Merge { path, value } | Op::Append { path, value } => {
                put("type", json!(if matches!(self, Op::Merge { .. }) { "merge" } else { "append" }));
                if let Some(p) = path.wire() {
                    put("path", p);
                }
                put("value", value.json(0));
            }
            Op::Increment { path, by } | Op::Decrement { path, by } => {
                put("type", json!(if matches!(self, Op::Increment { .. }) { "increment" } else { "decrement" }));
                put("path", Value::String(path.text()));
                put("by", json!(by));
            }
            Op::Remove { path } => {
                put("type", json!("remove"));
                put("path", Value::String(path.text()));
            }
        }
        Value::Object(op)
    }
}

#[derive(Arbitrary, Debug)]
struct Case {
    /// `None`: the item does not exist.
    current: Option<Val>,
    ops: Vec<Op>,
}

/// The target: decode `data` into a case, run both, compare.
pub fn update_ops(data: &[u8]) {
    let Ok(case) = Case::arbitrary_take_rest(Unstructured::new(data)) else { return };
    let current = case.current.as_ref().map(|v| v.json(0));
    let wire_ops = Value::Array(case.ops.iter().map(Op::wire).collect());
    let ops = update::parse_ops(&wire_ops)
        .unwrap_or_else(|e| panic!("well-formed ops refused: {e}\nops: {wire_ops}"));
    let (value, errors) = update::apply(current.as_ref(), &ops);
    let got: Vec<(usize, String)> = errors.iter().map(|e| (e.op_index, e.code.clone())).collect();
    for e in &errors {
        assert_eq!(e.doc_url, DOC_URL);
        assert!(!e.message.is_empty(), "error {} has no message", e.code);
    }

    let (want_value, want_errors) = model(current.as_ref(), &case.ops);
    assert_eq!(
        (&value, &got),
        (&want_value, &want_errors),
        "update::apply differs from the spec model\ncurrent: {current:?}\nops: {wire_ops}"
    );
}

/// §3.2: start from the value (or `{}` and "missing"), run every op, skip failures.
fn model(current: Option<&Value>, ops: &[Op]) -> (Value, Vec<(usize, String)>) {
    let mut missing = current.is_none();
    let mut doc = current.cloned().unwrap_or_else(|| json!({}));
    let mut errors = Vec::new();
    for (index, op) in ops.iter().enumerate() {
        let (name, result) = match op {
            Op::Set { path, value } => ("set", set(&mut doc, &path.text(), value.as_ref().map_or(Value::Null, |v| v.json(0)))),
            Op::Merge { path, value } => ("merge", merge(&mut doc, &path.segments(), &value.json(0))),
            Op::Increment { path, by } => ("increment", add(&mut doc, missing, &path.text(), i128::from(*by))),
            Op::Decrement { path, by } => ("decrement", add(&mut doc, missing, &path.text(), -i128::from(*by))),
            Op::Append { path, value } => ("append", append(&mut doc, missing, &path.segments(), &value.json(0))),
            Op::Remove { path } => ("remove", remove(&mut doc, &path.text())),
        };
        match result {
            // "Missing" holds until an op succeeds (shards/src/update.rs documents this reading of
            // §3.2's "no earlier op changed that"; see the fuzzing report).
            Ok(()) => missing = false,
            Err(suffix) => errors.push((index, format!("{name}.{suffix}"))),
        }
    }
    (doc, errors)
}

type Outcome = Result<(), &'static str>;

/// §3.4, first failure wins.
fn check_path(segments: &[String]) -> Outcome {
    if segments.len() > MAX_PATH_DEPTH {
        return Err("path.too_deep");
    }
    for s in segments {
        if s.is_empty() {
            return Err("path.empty_segment");
        }
        if s.len() > MAX_SEGMENT_BYTES {
            return Err("path.segment_too_long");
        }
        if PROTO_KEYS.contains(&s.as_str()) {
            return Err("path.proto_polluted");
        }
    }
    Ok(())
}

fn single(path: &str) -> Vec<String> {
    if path.is_empty() {
        Vec::new()
    } else {
        vec![path.to_owned()]
    }
}

fn set(doc: &mut Value, path: &str, value: Value) -> Outcome {
    check_path(&single(path))?;
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    doc.as_object_mut().ok_or("target_not_object")?.insert(path.to_owned(), value);
    Ok(())
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn merge(doc: &mut Value, segments: &[String], value: &Value) -> Outcome {
    check_path(segments)?;
    let entries = value.as_object().ok_or("value.not_an_object")?;
    if entries.len() > MAX_VALUE_KEYS {
        return Err("value.too_many_keys");
    }
    if entries.keys().any(|k| PROTO_KEYS.contains(&k.as_str())) {
        return Err("value.proto_polluted");
    }
    if depth(value) > MAX_VALUE_DEPTH {
        return Err("value.too_deep");
    }
    if segments.is_empty() {
        // Root merge onto a non-object: nothing happens, no error.
        if let Some(target) = doc.as_object_mut() {
            target.extend(entries.clone());
        }
        return Ok(());
    }
    objects_along(doc, segments).extend(entries.clone());
    Ok(())
}

/// The object at `segments` from `doc`, turning `doc` and every missing or non-object step into
/// `{}` on the way.
fn objects_along<'a>(doc: &'a mut Value, segments: &[String]) -> &'a mut Map<String, Value> {
    if !doc.is_object() {
        *doc = json!({});
    }
    let mut node = doc;
    for s in segments {
        let map = node.as_object_mut().expect("made an object");
        let child = map.entry(s.clone()).or_insert_with(|| json!({}));
        if !child.is_object() {
            *child = json!({});
        }
        node = child;
    }
    node.as_object_mut().expect("made an object")
}

/// Number arithmetic of §3.3: integers exact (i64, u64 for large positives), floats as f64 and
/// finite; anything else fails.
fn plus(n: &Value, delta: i128) -> Option<Value> {
    let n = n.as_number()?;
    let int = n.as_i64().map(i128::from).or_else(|| n.as_u64().map(i128::from));
    match int {
        Some(i) => integer(i + delta),
        None => Number::from_f64(n.as_f64()? + delta as f64).map(Value::Number),
    }
}

fn integer(v: i128) -> Option<Value> {
    i64::try_from(v).map(Value::from).ok().or_else(|| u64::try_from(v).map(Value::from).ok())
}

fn add(doc: &mut Value, missing: bool, path: &str, delta: i128) -> Outcome {
    check_path(&single(path))?;
    let delta_value = integer(delta).expect("±i64 fits in i64 or u64");
    if path.is_empty() {
        if missing {
            *doc = delta_value;
            return Ok(());
        }
        *doc = plus(doc, delta).ok_or("not_number")?;
        return Ok(());
    }
    let map = doc.as_object_mut().ok_or("target_not_object")?;
    match map.get_mut(path) {
        None => {
            map.insert(path.to_owned(), delta_value);
        }
        Some(current) => *current = plus(current, delta).ok_or("not_number")?,
    }
    Ok(())
}

/// The target rules of §3.3 `append`.
fn append_onto(target: &mut Value, value: &Value) -> Outcome {
    match (target, value) {
        (Value::Array(items), _) => items.push(value.clone()),
        (Value::String(s), Value::String(more)) => s.push_str(more),
        (target @ Value::Null, _) => *target = start_of(value),
        _ => return Err("type_mismatch"),
    }
    Ok(())
}

fn start_of(value: &Value) -> Value {
    if value.is_string() {
        value.clone()
    } else {
        json!([value])
    }
}

fn append(doc: &mut Value, missing: bool, segments: &[String], value: &Value) -> Outcome {
    check_path(segments)?;
    let Some((leaf, parents)) = segments.split_last() else {
        if missing {
            *doc = Value::Null;
        }
        return append_onto(doc, value);
    };
    if !doc.is_object() {
        return Err("target_not_object");
    }
    let parent = objects_along(doc, parents);
    match parent.get_mut(leaf) {
        Some(existing) => append_onto(existing, value),
        None => {
            let start = if parents.is_empty() { start_of(value) } else { json!([value]) };
            parent.insert(leaf.clone(), start);
            Ok(())
        }
    }
}

fn remove(doc: &mut Value, path: &str) -> Outcome {
    check_path(&single(path))?;
    if path.is_empty() {
        *doc = Value::Null;
        return Ok(());
    }
    doc.as_object_mut().ok_or("target_not_object")?.remove(path);
    Ok(())
}
