//! `meta/v1` Status bodies, with the exact messages and reasons of apimachinery's
//! `pkg/api/errors/errors.go` (and the few handler-level texts cited at each constructor).

use serde_json::{Value, json};

/// An API error: HTTP code plus the Status body.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub body: Value,
}

/// Identifies the resource an error is about, as `qualifiedResource` does in apimachinery.
#[derive(Clone, Debug)]
pub struct Qualified<'a> {
    pub group: &'a str,
    /// The plural resource name, e.g. `statelocks`.
    pub resource: &'a str,
    pub kind: &'a str,
}

impl Qualified<'_> {
    /// `resource.group`, or `resource` for the core group (schema.GroupResource.String()).
    pub fn group_resource(&self) -> String {
        if self.group.is_empty() { self.resource.to_owned() } else { format!("{}.{}", self.resource, self.group) }
    }

    /// `Kind.group`, or `Kind` for the core group (schema.GroupKind.String()).
    pub fn group_kind(&self) -> String {
        if self.group.is_empty() { self.kind.to_owned() } else { format!("{}.{}", self.kind, self.group) }
    }
}

fn status(code: u16, reason: &str, message: String, details: Option<Value>) -> ApiError {
    let mut body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
    });
    if let Some(d) = details {
        body["details"] = d;
    }
    body["code"] = json!(code);
    ApiError { code, body }
}

fn details(q: &Qualified<'_>, name: &str) -> Value {
    let mut d = serde_json::Map::new();
    if !name.is_empty() {
        d.insert("name".into(), json!(name));
    }
    if !q.group.is_empty() {
        d.insert("group".into(), json!(q.group));
    }
    d.insert("kind".into(), json!(q.resource));
    Value::Object(d)
}

/// errors.go NewNotFound: `statelocks.statelock.dev "x" not found`.
pub fn not_found(q: &Qualified<'_>, name: &str) -> ApiError {
    status(404, "NotFound", format!("{} \"{name}\" not found", q.group_resource()), Some(details(q, name)))
}

/// errors.go NewAlreadyExists.
pub fn already_exists(q: &Qualified<'_>, name: &str) -> ApiError {
    status(409, "AlreadyExists", format!("{} \"{name}\" already exists", q.group_resource()), Some(details(q, name)))
}

/// errors.go NewConflict with registry/generic/registry/store.go OptimisticLockErrorMsg.
pub fn conflict_modified(q: &Qualified<'_>, name: &str) -> ApiError {
    conflict(q, name, "the object has been modified; please apply your changes to the latest version and try again")
}

/// errors.go NewConflict: `Operation cannot be fulfilled on <gr> "<name>": <err>`.
pub fn conflict(q: &Qualified<'_>, name: &str, err: &str) -> ApiError {
    status(409, "Conflict", format!("Operation cannot be fulfilled on {} \"{name}\": {err}", q.group_resource()), Some(details(q, name)))
}

/// One `field.Error` of a 422: its type (`FieldValueRequired`, `FieldValueInvalid`, ...), field
/// path and the message after the path.
#[derive(Clone, Debug)]
pub struct Cause {
    pub reason: &'static str,
    pub field: String,
    pub message: String,
}

/// errors.go NewInvalid: `Kind.group "name" is invalid: <field>: <detail>[, ...]` with causes.
pub fn invalid(q: &Qualified<'_>, name: &str, causes: &[Cause]) -> ApiError {
    let msgs: Vec<String> = causes.iter().map(|c| format!("{}: {}", c.field, c.message)).collect();
    let message = if msgs.len() == 1 {
        format!("{} \"{name}\" is invalid: {}", q.group_kind(), msgs[0])
    } else {
        format!("{} \"{name}\" is invalid: [{}]", q.group_kind(), msgs.join(", "))
    };
    let mut d = serde_json::Map::new();
    if !name.is_empty() {
        d.insert("name".into(), json!(name));
    }
    if !q.group.is_empty() {
        d.insert("group".into(), json!(q.group));
    }
    d.insert("kind".into(), json!(q.kind));
    d.insert(
        "causes".into(),
        Value::Array(causes.iter().map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field})).collect()),
    );
    status(422, "Invalid", message, Some(Value::Object(d)))
}

/// A 422 about request options (ListOptions, PatchOptions), e.g.
/// `PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: is required for apply patch`.
pub fn invalid_options(kind: &str, causes: &[Cause]) -> ApiError {
    invalid(&Qualified { group: "meta.k8s.io", resource: "", kind }, "", causes)
}

/// errors.go NewBadRequest.
pub fn bad_request(message: impl Into<String>) -> ApiError {
    status(400, "BadRequest", message.into(), None)
}

/// errors.go NewMethodNotSupported.
pub fn method_not_supported(q: &Qualified<'_>, action: &str) -> ApiError {
    status(
        405,
        "MethodNotAllowed",
        format!("{action} is not supported on resources of kind {:?}", q.group_resource()),
        Some(json!({"group": q.group, "kind": q.resource})),
    )
}

/// errors.go NewUnsupportedMediaType / customresource_handler.go:328 for strategic merge on CRs.
pub fn unsupported_media_type(message: impl Into<String>) -> ApiError {
    status(415, "UnsupportedMediaType", message.into(), None)
}

/// The 415 a CR answers to a strategic-merge patch (customresource_handler.go:328).
pub fn strategic_merge_on_cr() -> ApiError {
    unsupported_media_type(
        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
    )
}

/// errors.go NewResourceExpired (410 Expired), used for watches and continue tokens.
pub fn expired(message: impl Into<String>) -> ApiError {
    status(410, "Expired", message.into(), None)
}

/// errors.go NewGone-style message for a watch from a compacted revision.
pub fn too_old_resource_version(requested: u64, oldest: u64) -> ApiError {
    expired(format!("too old resource version: {requested} ({oldest})"))
}

/// The handler's answer to an unknown URL (endpoints/handlers/responsewriters NotFound).
pub fn unknown_url() -> ApiError {
    status(404, "NotFound", "the server could not find the requested resource".into(), Some(json!({})))
}

/// errors.go NewForbidden with the RBAC authorizer's reason.
pub fn forbidden(q: &Qualified<'_>, name: &str, reason: String) -> ApiError {
    let subject = if name.is_empty() { q.group_resource() } else { format!("{} \"{name}\"", q.group_resource()) };
    status(403, "Forbidden", format!("{subject} is forbidden: {reason}"), Some(details(q, name)))
}

/// errors.go NewUnauthorized.
pub fn unauthorized() -> ApiError {
    status(401, "Unauthorized", "Unauthorized".into(), None)
}

/// errors.go NewInternalError.
pub fn internal(message: impl Into<String>) -> ApiError {
    let m = message.into();
    status(500, "InternalError", format!("Internal error occurred: {m}"), Some(json!({"causes": [{"message": m}]})))
}

/// errors.go NewNotAcceptable-style 406.
pub fn not_acceptable(message: impl Into<String>) -> ApiError {
    status(406, "NotAcceptable", message.into(), None)
}

/// The `status: Success` body returned by an immediate delete of a custom resource (store.go:1458).
pub fn delete_success(q: &Qualified<'_>, name: &str, uid: &str) -> Value {
    let mut d = details(q, name);
    d["uid"] = json!(uid);
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": d})
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATELOCKS: Qualified<'static> = Qualified { group: "statelock.dev", resource: "statelocks", kind: "StateLock" };
    const PODS: Qualified<'static> = Qualified { group: "", resource: "pods", kind: "Pod" };

    // Golden bodies. Each message follows the cited constructor in kubernetes/apimachinery
    // pkg/api/errors/errors.go (NewNotFound, NewAlreadyExists, NewConflict, NewInvalid,
    // NewResourceExpired) or apiserver registry/generic/registry/store.go (OptimisticLockErrorMsg).
    #[test]
    fn golden_not_found() {
        assert_eq!(
            serde_json::to_string(&not_found(&STATELOCKS, "x").body).expect("json"),
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"statelocks.statelock.dev \"x\" not found","reason":"NotFound","details":{"name":"x","group":"statelock.dev","kind":"statelocks"},"code":404}"#
        );
        assert_eq!(
            serde_json::to_string(&not_found(&PODS, "p").body).expect("json"),
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"pods \"p\" not found","reason":"NotFound","details":{"name":"p","kind":"pods"},"code":404}"#
        );
    }

    #[test]
    fn golden_conflict_and_already_exists() {
        assert_eq!(
            serde_json::to_string(&conflict_modified(&STATELOCKS, "x").body).expect("json"),
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Operation cannot be fulfilled on statelocks.statelock.dev \"x\": the object has been modified; please apply your changes to the latest version and try again","reason":"Conflict","details":{"name":"x","group":"statelock.dev","kind":"statelocks"},"code":409}"#
        );
        assert_eq!(
            serde_json::to_string(&already_exists(&PODS, "p").body).expect("json"),
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"pods \"p\" already exists","reason":"AlreadyExists","details":{"name":"p","kind":"pods"},"code":409}"#
        );
    }

    #[test]
    fn golden_expired_and_unknown_url() {
        // apiserver storage/cacher watch_cache_history / errors.go NewResourceExpired.
        assert_eq!(
            serde_json::to_string(&too_old_resource_version(5, 20).body).expect("json"),
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"too old resource version: 5 (20)","reason":"Expired","code":410}"#
        );
        assert_eq!(
            serde_json::to_string(&unknown_url().body).expect("json"),
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"the server could not find the requested resource","reason":"NotFound","details":{},"code":404}"#
        );
    }

    #[test]
    fn golden_invalid_apply_without_field_manager() {
        // apimachinery pkg/apis/meta/v1/validation ValidatePatchOptions.
        let e = invalid_options(
            "PatchOptions",
            &[Cause {
                reason: "FieldValueRequired",
                field: "fieldManager".into(),
                message: "Required value: is required for apply patch".into(),
            }],
        );
        assert_eq!(e.code, 422);
        assert_eq!(
            e.body["message"],
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch"
        );
    }
}
