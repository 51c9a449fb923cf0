//! Kubernetes label selectors (`matchLabels` and `matchExpressions`),
//! validated once and then matched against label sets.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1 as metav1;
use serde::{Deserialize, Serialize};

use super::ObjectError;

/// Labels of an object.
pub type Labels = BTreeMap<String, String>;

/// A validated label selector. The empty selector matches everything.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
enum Requirement {
    Equals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Selector {
    /// A selector no labels match (an `In` with no values, which the API
    /// refuses in objects, so it never comes from one).
    pub fn nothing() -> Self {
        Self {
            requirements: vec![Requirement::In("palisade.io/nothing".into(), Vec::new())],
        }
    }

    /// Convert and validate a selector found at `path` (used in errors).
    pub fn from_k8s(sel: &metav1::LabelSelector, path: &str) -> Result<Self, ObjectError> {
        let mut requirements = Vec::new();
        if let Some(ml) = &sel.match_labels {
            for (k, v) in ml {
                validate_label_key(k, &format!("{path}.matchLabels"))?;
                validate_label_value(v, &format!("{path}.matchLabels[{k}]"))?;
                requirements.push(Requirement::Equals(k.clone(), v.clone()));
            }
        }
        for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
            let here = format!("{path}.matchExpressions[{i}]");
            validate_label_key(&e.key, &here)?;
            let values = e.values.clone().unwrap_or_default();
            let req = match e.operator.as_str() {
                "In" | "NotIn" => {
                    if values.is_empty() {
                        return Err(ObjectError::invalid(
                            &here,
                            format!("operator {} needs at least one value", e.operator),
                        ));
                    }
                    for v in &values {
                        validate_label_value(v, &here)?;
                    }
                    if e.operator == "In" {
                        Requirement::In(e.key.clone(), values)
                    } else {
                        Requirement::NotIn(e.key.clone(), values)
                    }
                }
                "Exists" | "DoesNotExist" => {
                    if !values.is_empty() {
                        return Err(ObjectError::invalid(
                            &here,
                            format!("operator {} takes no values", e.operator),
                        ));
                    }
                    if e.operator == "Exists" {
                        Requirement::Exists(e.key.clone())
                    } else {
                        Requirement::DoesNotExist(e.key.clone())
                    }
                }
                other => {
                    return Err(ObjectError::invalid(
                        &here,
                        format!(
                            "unknown operator {other:?}; use In, NotIn, Exists or DoesNotExist"
                        ),
                    ));
                }
            };
            requirements.push(req);
        }
        Ok(Self { requirements })
    }

    /// A selector that requires exactly these labels.
    pub fn from_labels(labels: &Labels) -> Self {
        Self {
            requirements: labels
                .iter()
                .map(|(k, v)| Requirement::Equals(k.clone(), v.clone()))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }

    /// A kubectl-style rendering: `app=web,tier in (a,b),!debug`.
    pub fn describe(&self) -> String {
        if self.requirements.is_empty() {
            return "<all>".into();
        }
        self.requirements
            .iter()
            .map(|r| match r {
                Requirement::Equals(k, v) => format!("{k}={v}"),
                Requirement::In(k, vs) => format!("{k} in ({})", vs.join(",")),
                Requirement::NotIn(k, vs) => format!("{k} notin ({})", vs.join(",")),
                Requirement::Exists(k) => k.clone(),
                Requirement::DoesNotExist(k) => format!("!{k}"),
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'
}

/// A qualified name: at most 63 characters of `[A-Za-z0-9-_.]`, starting and
/// ending alphanumeric.
fn valid_name_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(is_name_char)
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// A DNS subdomain (RFC 1123), as used for label key prefixes and names.
pub fn valid_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

/// A DNS label (RFC 1123), as used for namespace names.
pub fn valid_dns_label(s: &str) -> bool {
    !s.contains('.') && s.len() <= 63 && valid_dns_subdomain(s)
}

pub fn validate_label_key(k: &str, path: &str) -> Result<(), ObjectError> {
    let ok = match k.split_once('/') {
        Some((prefix, name)) => valid_dns_subdomain(prefix) && valid_name_part(name),
        None => valid_name_part(k),
    };
    if ok {
        Ok(())
    } else {
        Err(ObjectError::invalid(
            path,
            format!(
                "invalid label key {k:?}: use an optional DNS-subdomain prefix and '/', then up to 63 \
                 characters of letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
            ),
        ))
    }
}

pub fn validate_label_value(v: &str, path: &str) -> Result<(), ObjectError> {
    if v.is_empty() || valid_name_part(v) {
        Ok(())
    } else {
        Err(ObjectError::invalid(
            path,
            format!(
                "invalid label value {v:?}: up to 63 characters of letters, digits, '-', '_' or '.', \
                 starting and ending with a letter or digit"
            ),
        ))
    }
}

pub fn validate_labels(labels: &Labels, path: &str) -> Result<(), ObjectError> {
    for (k, v) in labels {
        validate_label_key(k, path)?;
        validate_label_value(v, &format!("{path}[{k}]"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use metav1::{LabelSelector, LabelSelectorRequirement};

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: if values.is_empty() {
                None
            } else {
                Some(values.iter().map(|s| s.to_string()).collect())
            },
        }
    }

    #[test]
    fn empty_selector_matches_everything() {
        let s = Selector::from_k8s(&LabelSelector::default(), "s").unwrap();
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_and_expressions_are_anded() {
        let sel = LabelSelector {
            match_labels: Some([("app".to_string(), "web".to_string())].into()),
            match_expressions: Some(vec![
                expr("tier", "In", &["a", "b"]),
                expr("debug", "DoesNotExist", &[]),
            ]),
        };
        let s = Selector::from_k8s(&sel, "s").unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "a")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "c")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "b"), ("debug", "1")])));
        assert!(!s.matches(&labels(&[("app", "db"), ("tier", "b")])));
    }

    #[test]
    fn not_in_matches_absent_keys_and_exists_needs_the_key() {
        let sel = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![expr("env", "NotIn", &["prod"])]),
        };
        let s = Selector::from_k8s(&sel, "s").unwrap();
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("env", "dev")])));
        assert!(!s.matches(&labels(&[("env", "prod")])));

        let sel = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![expr("env", "Exists", &[])]),
        };
        let s = Selector::from_k8s(&sel, "s").unwrap();
        assert!(!s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("env", "")])));
    }

    #[test]
    fn invalid_selectors_are_rejected_with_the_path() {
        let bad_op = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![expr("a", "Equals", &["x"])]),
        };
        let err = Selector::from_k8s(&bad_op, "spec.podSelector")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("spec.podSelector.matchExpressions[0]"),
            "{err}"
        );
        assert!(err.contains("In, NotIn, Exists or DoesNotExist"), "{err}");

        let in_without_values = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![expr("a", "In", &[])]),
        };
        assert!(Selector::from_k8s(&in_without_values, "s").is_err());

        let bad_key = LabelSelector {
            match_labels: Some([("-bad".to_string(), "x".to_string())].into()),
            match_expressions: None,
        };
        assert!(Selector::from_k8s(&bad_key, "s").is_err());
    }

    #[test]
    fn label_keys_with_prefixes_are_valid() {
        assert!(validate_label_key("kubernetes.io/metadata.name", "p").is_ok());
        assert!(validate_label_key("app", "p").is_ok());
        assert!(validate_label_key("Bad_Prefix/x", "p").is_err());
        assert!(validate_label_value("", "p").is_ok());
        assert!(validate_label_value("a b", "p").is_err());
    }
}
