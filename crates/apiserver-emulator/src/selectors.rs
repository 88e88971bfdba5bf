//! Label selectors (`=`, `==`, `!=`, `in`, `notin`, `key`, `!key`) and field selectors.

use serde_json::Value;

#[derive(Clone, Debug, PartialEq)]
enum Req {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LabelSelector(Vec<Req>);

impl LabelSelector {
    /// Parse the `labelSelector` query parameter.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for part in split_top_level(s) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let req = if let Some(k) = part.strip_prefix('!') {
                Req::NotExists(check_key(k.trim())?)
            } else if let Some((k, v)) = part.split_once("!=") {
                Req::NotEq(check_key(k.trim())?, v.trim().to_owned())
            } else if let Some((k, v)) = part.split_once("==") {
                Req::Eq(check_key(k.trim())?, v.trim().to_owned())
            } else if let Some((k, v)) = part.split_once('=') {
                Req::Eq(check_key(k.trim())?, v.trim().to_owned())
            } else if let Some((k, rest)) = split_word(part, " notin ") {
                Req::NotIn(check_key(k)?, parse_set(rest)?)
            } else if let Some((k, rest)) = split_word(part, " in ") {
                Req::In(check_key(k)?, parse_set(rest)?)
            } else {
                Req::Exists(check_key(part)?)
            };
            reqs.push(req);
        }
        Ok(Self(reqs))
    }

    /// Does an object's `metadata.labels` match?
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Req::Eq(k, v) => get(k) == Some(v.as_str()),
            Req::NotEq(k, v) => get(k) != Some(v.as_str()),
            Req::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Req::NotIn(k, vs) => get(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
            Req::Exists(k) => get(k).is_some(),
            Req::NotExists(k) => get(k).is_none(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn split_word<'a>(s: &'a str, word: &str) -> Option<(&'a str, &'a str)> {
    let i = s.find(word)?;
    Some((s[..i].trim(), s[i + word.len()..].trim()))
}

fn parse_set(s: &str) -> Result<Vec<String>, String> {
    let inner = s
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("unable to parse requirement: expected a set in parentheses, got {s:?}"))?;
    Ok(inner.split(',').map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()).collect())
}

fn check_key(k: &str) -> Result<String, String> {
    let ok = !k.is_empty() && k.len() <= 317 && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if ok { Ok(k.to_owned()) } else { Err(format!("unable to parse requirement: invalid label key {k:?}")) }
}

/// Split on commas that are not inside parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let (mut depth, mut start, mut out) = (0i32, 0usize, Vec::new());
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

/// A parsed field selector: `field=value`, `field==value`, `field!=value`, comma-separated.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// Parse, checking every field against the ones the type supports.
    pub fn parse(s: &str, supported: &dyn Fn(&str) -> bool) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, eq, value) = if let Some((k, v)) = part.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = part.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = part.split_once('=') {
                (k, true, v)
            } else {
                return Err(format!("invalid selector: '{s}'; can't understand '{part}'"));
            };
            let field = field.trim();
            if !supported(field) {
                return Err(format!("field label not supported: {field}"));
            }
            reqs.push((field.to_owned(), eq, value.trim().to_owned()));
        }
        Ok(Self(reqs))
    }

    /// Does the object match? Missing fields compare as the empty string, as in the apiserver.
    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(field, eq, want)| {
            let got = field_value(obj, field);
            (got == *want) == *eq
        })
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The string value of a dotted field path (`involvedObject.name`, `source` = `source.component`).
pub fn field_value(obj: &Value, field: &str) -> String {
    let mut cur = obj;
    for part in field.split('.') {
        cur = &cur[part];
    }
    if field == "source" {
        cur = &obj["source"]["component"];
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selector_operators() {
        let o = json!({"metadata": {"labels": {"app": "tf", "tier": "runner"}}});
        for (sel, want) in [
            ("app=tf", true),
            ("app==tf", true),
            ("app!=tf", false),
            ("app in (a, tf)", true),
            ("app notin (tf)", false),
            ("missing notin (tf)", true),
            ("tier", true),
            ("!tier", false),
            ("!missing", true),
            ("app=tf,tier in (runner,x)", true),
            ("app=tf,tier=x", false),
        ] {
            assert_eq!(LabelSelector::parse(sel).expect(sel).matches(&o), want, "{sel}");
        }
        assert!(LabelSelector::parse("a in b").is_err());
    }

    #[test]
    fn field_selectors_check_support_and_match() {
        let ok = |f: &str| f == "metadata.name" || f == "involvedObject.name";
        let o = json!({"metadata": {"name": "x"}, "involvedObject": {"name": "lock"}});
        assert!(FieldSelector::parse("metadata.name=x", &ok).expect("ok").matches(&o));
        assert!(!FieldSelector::parse("metadata.name!=x", &ok).expect("ok").matches(&o));
        assert!(FieldSelector::parse("involvedObject.name==lock", &ok).expect("ok").matches(&o));
        assert_eq!(FieldSelector::parse("spec.x=1", &ok), Err("field label not supported: spec.x".into()));
    }
}
