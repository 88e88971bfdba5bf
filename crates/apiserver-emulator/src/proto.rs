//! Decoding of the Kubernetes protobuf envelope for the few built-in kinds that kubectl's
//! imperative commands (`create namespace`, `create configmap`, `create secret`,
//! `create serviceaccount`) send as protobuf. Responses are always JSON, which client-go accepts.

use serde_json::{Map, Value, json};

use crate::api::b64;

#[derive(Clone, Copy)]
enum Kind {
    Str,
    Bytes,
    Int,
    Bool,
    Time,
    Msg(&'static [Field]),
    MapStr,
    MapBytes,
    RepStr,
    RepMsg(&'static [Field]),
}

type Field = (u64, &'static str, Kind);

const OWNER_REF: &[Field] = &[
    (1, "kind", Kind::Str),
    (3, "name", Kind::Str),
    (4, "uid", Kind::Str),
    (5, "apiVersion", Kind::Str),
    (6, "controller", Kind::Bool),
    (7, "blockOwnerDeletion", Kind::Bool),
];
const OBJECT_META: &[Field] = &[
    (1, "name", Kind::Str),
    (2, "generateName", Kind::Str),
    (3, "namespace", Kind::Str),
    (5, "uid", Kind::Str),
    (6, "resourceVersion", Kind::Str),
    (7, "generation", Kind::Int),
    (8, "creationTimestamp", Kind::Time),
    (11, "labels", Kind::MapStr),
    (12, "annotations", Kind::MapStr),
    (13, "ownerReferences", Kind::RepMsg(OWNER_REF)),
    (14, "finalizers", Kind::RepStr),
];
const NAMESPACE: &[Field] = &[
    (1, "metadata", Kind::Msg(OBJECT_META)),
    (2, "spec", Kind::Msg(&[(1, "finalizers", Kind::RepStr)])),
    (3, "status", Kind::Msg(&[(1, "phase", Kind::Str)])),
];
const CONFIG_MAP: &[Field] =
    &[(1, "metadata", Kind::Msg(OBJECT_META)), (2, "data", Kind::MapStr), (3, "binaryData", Kind::MapBytes), (4, "immutable", Kind::Bool)];
const SECRET: &[Field] = &[
    (1, "metadata", Kind::Msg(OBJECT_META)),
    (2, "data", Kind::MapBytes),
    (3, "type", Kind::Str),
    (4, "stringData", Kind::MapStr),
    (5, "immutable", Kind::Bool),
];
const LOCAL_REF: &[Field] = &[(1, "name", Kind::Str)];
const SERVICE_ACCOUNT: &[Field] = &[
    (1, "metadata", Kind::Msg(OBJECT_META)),
    (3, "imagePullSecrets", Kind::RepMsg(LOCAL_REF)),
    (4, "automountServiceAccountToken", Kind::Bool),
];

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.b.get(self.i)?;
            self.i += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.varint()?).ok()?;
        let s = self.b.get(self.i..self.i.checked_add(n)?)?;
        self.i += n;
        Some(s)
    }

    /// Next (field, wire type, payload); varints come back as `Err(value)`.
    fn next(&mut self) -> Option<(u64, Result<&'a [u8], u64>)> {
        let tag = self.varint()?;
        let (field, wire) = (tag >> 3, tag & 7);
        match wire {
            0 => Some((field, Err(self.varint()?))),
            2 => Some((field, Ok(self.bytes()?))),
            1 => {
                self.i += 8;
                Some((field, Err(0)))
            }
            5 => {
                self.i += 4;
                Some((field, Err(0)))
            }
            _ => None,
        }
    }
}

fn message(b: &[u8], fields: &[Field]) -> Option<Value> {
    let mut out = Map::new();
    let mut r = Reader { b, i: 0 };
    while r.i < b.len() {
        let (num, payload) = r.next()?;
        let Some((_, name, kind)) = fields.iter().find(|(n, _, _)| *n == num) else { continue };
        let text = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
        match (kind, payload) {
            (Kind::Str, Ok(p)) => {
                // proto3 leaves defaults out; so does the JSON encoding of the same object.
                if !p.is_empty() {
                    out.insert((*name).into(), json!(text(p)));
                }
            }
            (Kind::Bytes, Ok(p)) => {
                out.insert((*name).into(), json!(b64(p)));
            }
            (Kind::Int, Err(v)) => {
                out.insert((*name).into(), json!(v as i64));
            }
            (Kind::Bool, Err(v)) => {
                out.insert((*name).into(), json!(v != 0));
            }
            (Kind::Time, Ok(p)) => {
                let t = message(p, &[(1, "seconds", Kind::Int)])?;
                out.insert((*name).into(), json!(crate::clock::format_rfc3339(t["seconds"].as_i64().unwrap_or(0), None)));
            }
            (Kind::Msg(f), Ok(p)) => {
                out.insert((*name).into(), message(p, f)?);
            }
            (Kind::RepMsg(f), Ok(p)) => {
                let item = message(p, f)?;
                out.entry(*name).or_insert_with(|| json!([])).as_array_mut()?.push(item);
            }
            (Kind::RepStr, Ok(p)) => {
                out.entry(*name).or_insert_with(|| json!([])).as_array_mut()?.push(json!(text(p)));
            }
            (Kind::MapStr | Kind::MapBytes, Ok(p)) => {
                let entry =
                    message(p, &[(1, "k", Kind::Str), (2, "v", if matches!(kind, Kind::MapStr) { Kind::Str } else { Kind::Bytes })])?;
                let k = entry["k"].as_str().unwrap_or_default().to_owned();
                let v = entry.get("v").cloned().unwrap_or(json!(""));
                out.entry(*name).or_insert_with(|| json!({})).as_object_mut()?.insert(k, v);
            }
            _ => return None,
        }
    }
    Some(Value::Object(out))
}

/// Decode a protobuf request body into the JSON object it encodes, or say why not.
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let rest = body.strip_prefix(b"k8s\0").ok_or("the body does not start with the Kubernetes protobuf magic")?;
    let unknown =
        message(rest, &[(1, "typeMeta", Kind::Msg(&[(1, "apiVersion", Kind::Str), (2, "kind", Kind::Str)])), (2, "raw", Kind::Bytes)])
            .ok_or("the protobuf envelope could not be parsed")?;
    let api_version = unknown["typeMeta"]["apiVersion"].as_str().unwrap_or_default().to_owned();
    let kind = unknown["typeMeta"]["kind"].as_str().unwrap_or_default().to_owned();
    let raw = {
        let mut r = Reader { b: rest, i: 0 };
        let mut raw: &[u8] = &[];
        while r.i < rest.len() {
            match r.next() {
                Some((2, Ok(p))) => raw = p,
                Some(_) => {}
                None => break,
            }
        }
        raw
    };
    let fields = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => NAMESPACE,
        ("v1", "ConfigMap") => CONFIG_MAP,
        ("v1", "Secret") => SECRET,
        ("v1", "ServiceAccount") => SERVICE_ACCOUNT,
        _ => return Err(format!("protobuf bodies of {api_version} {kind} are not supported by the emulator; send JSON")),
    };
    let mut obj = message(raw, fields).ok_or_else(|| format!("the protobuf {kind} could not be parsed"))?;
    obj["apiVersion"] = json!(api_version);
    obj["kind"] = json!(kind);
    Ok(obj)
}
