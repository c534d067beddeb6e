//! Migration policies (KubeVirt's `MigrationPolicy`): settings that apply to
//! the VMs whose labels, and whose source host's labels, match the policy's
//! selectors. This module parses them (KubeVirt's YAML as written, or our
//! shorter native form), checks them, picks the policy that applies to a VM
//! (OpenShift's documented precedence) and layers it between the daemon's
//! defaults and a migration's own options.
//!
//! Native form (also the JSON of the API and of the stores):
//!
//! ```yaml
//! name: production-db
//! vmSelector: {kubevirt.io/environment: production}
//! hostSelector: {hpc-workloads: "True"}
//! allowAutoConverge: true
//! bandwidthPerMigration: 64Mi
//! completionTimeoutPerGiB: 100
//! allowPostCopy: false
//! ```
//!
//! In KubeVirt's form `spec.selectors.virtualMachineInstanceSelector` is
//! read as `vmSelector` and `spec.selectors.namespaceSelector` as
//! `hostSelector` (we have no namespaces; the source host's labels stand in).

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::fmt;

use serde::{de, Deserialize, Deserializer, Serialize};

use crate::config::MigrationDefaults;
use crate::model::{check_name, InvalidNameError, MigrationConfiguration, MigrationOverrides};
use crate::quantity::Quantity;

use super::Labels;

/// The `apiVersion` of KubeVirt's MigrationPolicy that we read.
pub const KUBEVIRT_API_VERSION: &str = "migrations.kubevirt.io/v1alpha1";
const KUBEVIRT_KIND: &str = "MigrationPolicy";

/// One policy. `None` fields leave the host default in force.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigrationPolicy {
    pub name: String,
    /// Labels the VM must all carry. Empty matches every VM.
    #[serde(
        default,
        deserialize_with = "de_labels",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub vm_selector: Labels,
    /// Labels the source host must all carry. Empty matches every host.
    #[serde(
        default,
        deserialize_with = "de_labels",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub host_selector: Labels,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_auto_converge: Option<bool>,
    /// Wire bytes per second; 0 = unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_per_migration: Option<Quantity>,
    /// Seconds per GiB of guest memory.
    #[serde(
        default,
        rename = "completionTimeoutPerGiB",
        skip_serializing_if = "Option::is_none"
    )]
    pub completion_timeout_per_gib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_post_copy: Option<bool>,
}

/// A policy that parsed but cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPolicyError {
    #[error(transparent)]
    Name(#[from] InvalidNameError),
    #[error("{selector}: label key {key:?} is not valid: write [prefix/]name, where name is 1-63 letters, digits, '-', '_' or '.' starting and ending with a letter or digit, and the optional prefix is a lower-case DNS subdomain (e.g. kubevirt.io/environment)")]
    SelectorKey { selector: &'static str, key: String },
    #[error("{selector}: value {value:?} of label {key:?} is not valid: use at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit, or an empty string")]
    SelectorValue {
        selector: &'static str,
        key: String,
        value: String,
    },
    #[error("completionTimeoutPerGiB must be greater than 0")]
    ZeroCompletionTimeout,
}

/// Why a policy document was refused. `doc` counts from 1 in a
/// multi-document (`---`) file.
#[derive(Debug, thiserror::Error)]
pub enum ParsePolicyError {
    #[error("policy document {doc} is not valid YAML")]
    Syntax {
        doc: usize,
        #[source]
        source: serde_norway::Error,
    },
    /// A field is unknown, missing or has a bad value; `field` is its
    /// dotted path (`spec.selectors.foo`).
    #[error("policy document {doc}: {field}: {message}")]
    Field {
        doc: usize,
        field: String,
        message: String,
    },
    #[error("policy document {doc}: apiVersion {found:?} is not supported: use {KUBEVIRT_API_VERSION:?}")]
    ApiVersion { doc: usize, found: String },
    #[error("policy document {doc}: kind {found:?} is not supported: use \"MigrationPolicy\"")]
    Kind { doc: usize, found: String },
    #[error("policy document {doc} is invalid")]
    Invalid {
        doc: usize,
        #[source]
        source: InvalidPolicyError,
    },
    #[error("no policy in the input")]
    Empty,
}

/// KubeVirt's document, field for field.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct KubeVirtPolicy {
    api_version: String,
    kind: String,
    metadata: KubeVirtMetadata,
    #[serde(default)]
    spec: KubeVirtSpec,
}

/// Object labels and annotations are accepted (manifests carry them) and
/// not kept: selection uses the spec's selectors only.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KubeVirtMetadata {
    name: String,
    #[serde(default, rename = "labels")]
    _labels: BTreeMap<String, String>,
    #[serde(default, rename = "annotations")]
    _annotations: BTreeMap<String, String>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct KubeVirtSpec {
    allow_auto_converge: Option<bool>,
    bandwidth_per_migration: Option<Quantity>,
    #[serde(rename = "completionTimeoutPerGiB")]
    completion_timeout_per_gib: Option<u64>,
    allow_post_copy: Option<bool>,
    #[serde(default)]
    selectors: KubeVirtSelectors,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct KubeVirtSelectors {
    #[serde(default, deserialize_with = "de_labels")]
    namespace_selector: Labels,
    #[serde(default, deserialize_with = "de_labels")]
    virtual_machine_instance_selector: Labels,
}

impl From<KubeVirtPolicy> for MigrationPolicy {
    fn from(k: KubeVirtPolicy) -> Self {
        Self {
            name: k.metadata.name,
            vm_selector: k.spec.selectors.virtual_machine_instance_selector,
            host_selector: k.spec.selectors.namespace_selector,
            allow_auto_converge: k.spec.allow_auto_converge,
            bandwidth_per_migration: k.spec.bandwidth_per_migration,
            completion_timeout_per_gib: k.spec.completion_timeout_per_gib,
            allow_post_copy: k.spec.allow_post_copy,
        }
    }
}

/// Label values are strings. YAML reads an unquoted `true` or `5` as
/// something else; say how to write it instead of a bare type error.
struct LabelValue(String);

impl<'de> Deserialize<'de> for LabelValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = LabelValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a label value (a string)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<LabelValue, E> {
                Ok(LabelValue(v.into()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<LabelValue, E> {
                Err(E::custom(format!(
                    "label values are strings: quote it as the label is written, e.g. \"{v}\" or \"True\""
                )))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<LabelValue, E> {
                Err(E::custom(format!(
                    "label values are strings: quote it, e.g. \"{v}\""
                )))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<LabelValue, E> {
                self.visit_i64(v as i64)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<LabelValue, E> {
                Err(E::custom(format!(
                    "label values are strings: quote it, e.g. \"{v}\""
                )))
            }
        }
        d.deserialize_any(V)
    }
}

fn de_labels<'de, D: Deserializer<'de>>(d: D) -> Result<Labels, D::Error> {
    let m = Option::<BTreeMap<String, LabelValue>>::deserialize(d)?;
    Ok(m.unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect())
}

/// Reads one or more policies (YAML, `---`-separated; JSON is YAML too), in
/// KubeVirt's form or the native one, and checks each.
pub fn parse_policies(text: &str) -> Result<Vec<MigrationPolicy>, ParsePolicyError> {
    let mut out = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let doc_no = i + 1;
        let value =
            serde_norway::Value::deserialize(doc).map_err(|source| ParsePolicyError::Syntax {
                doc: doc_no,
                source,
            })?;
        if value.is_null() {
            // An empty document, e.g. after a trailing `---`.
            continue;
        }
        out.push(policy_from_value(value, doc_no)?);
    }
    if out.is_empty() {
        return Err(ParsePolicyError::Empty);
    }
    Ok(out)
}

/// Reads exactly one policy.
pub fn parse_policy(text: &str) -> Result<MigrationPolicy, ParsePolicyError> {
    let mut all = parse_policies(text)?;
    match all.len() {
        1 => Ok(all.remove(0)),
        n => Err(ParsePolicyError::Field {
            doc: 2,
            field: "(document)".into(),
            message: format!("expected one policy, found {n}"),
        }),
    }
}

fn policy_from_value(
    value: serde_norway::Value,
    doc: usize,
) -> Result<MigrationPolicy, ParsePolicyError> {
    let field_err = |e: serde_path_to_error::Error<serde_norway::Error>| {
        let field = e.path().to_string();
        let field = if field == "." || field.is_empty() {
            "(top level)".to_string()
        } else {
            field
        };
        ParsePolicyError::Field {
            doc,
            field,
            message: e.into_inner().to_string(),
        }
    };
    let is_kubevirt = value
        .as_mapping()
        .is_some_and(|m| m.contains_key("apiVersion") || m.contains_key("kind"));
    let policy = if is_kubevirt {
        let k: KubeVirtPolicy = serde_path_to_error::deserialize(value).map_err(field_err)?;
        if k.api_version != KUBEVIRT_API_VERSION {
            return Err(ParsePolicyError::ApiVersion {
                doc,
                found: k.api_version,
            });
        }
        if k.kind != KUBEVIRT_KIND {
            return Err(ParsePolicyError::Kind { doc, found: k.kind });
        }
        MigrationPolicy::from(k)
    } else {
        serde_path_to_error::deserialize(value).map_err(field_err)?
    };
    policy
        .validate()
        .map_err(|source| ParsePolicyError::Invalid { doc, source })?;
    Ok(policy)
}

/// A Kubernetes label name: 1-63 characters, alphanumerics at both ends,
/// `-_.` inside.
fn label_name_ok(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(c))
}

/// A DNS subdomain (RFC 1123): dot-separated lower-case labels.
fn dns_subdomain_ok(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|l| {
            let b = l.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}

/// Kubernetes label key syntax: `[prefix/]name`.
pub fn label_key_ok(key: &str) -> bool {
    match key.split_once('/') {
        Some((prefix, name)) => dns_subdomain_ok(prefix) && label_name_ok(name),
        None => label_name_ok(key),
    }
}

/// Kubernetes label value syntax: empty, or a label name.
pub fn label_value_ok(value: &str) -> bool {
    value.is_empty() || label_name_ok(value)
}

/// How well a policy matches: the number of selector labels matched and
/// their keys in alphabetical order (the tie-breaker).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct MatchScore<'a> {
    pub labels: usize,
    pub keys: Vec<&'a str>,
}

impl MigrationPolicy {
    /// Checks the name and the selectors' label syntax.
    pub fn validate(&self) -> Result<(), InvalidPolicyError> {
        check_name("policy name", &self.name)?;
        for (selector, labels) in [
            ("vmSelector", &self.vm_selector),
            ("hostSelector", &self.host_selector),
        ] {
            for (key, value) in labels {
                if !label_key_ok(key) {
                    return Err(InvalidPolicyError::SelectorKey {
                        selector,
                        key: key.clone(),
                    });
                }
                if !label_value_ok(value) {
                    return Err(InvalidPolicyError::SelectorValue {
                        selector,
                        key: key.clone(),
                        value: value.clone(),
                    });
                }
            }
        }
        if self.completion_timeout_per_gib == Some(0) {
            return Err(InvalidPolicyError::ZeroCompletionTimeout);
        }
        Ok(())
    }

    /// `Some(score)` if every selector label is on the VM (vmSelector) or
    /// the source host (hostSelector); an empty policy matches with 0.
    pub fn matches(&self, vm: &Labels, host: &Labels) -> Option<MatchScore<'_>> {
        let all = |sel: &Labels, have: &Labels| sel.iter().all(|(k, v)| have.get(k) == Some(v));
        if !all(&self.vm_selector, vm) || !all(&self.host_selector, host) {
            return None;
        }
        let mut keys: Vec<&str> = self
            .vm_selector
            .keys()
            .chain(self.host_selector.keys())
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        Some(MatchScore {
            labels: keys.len(),
            keys,
        })
    }
}

/// The policy that applies to a VM with `vm` labels migrating from a host
/// with `host` labels. OpenShift's rule: the one matching the most labels;
/// among those, the one whose matching label keys sort first
/// alphabetically; then (our addition, so the choice never depends on
/// listing order) the smallest name.
pub fn select_policy<'a>(
    policies: impl IntoIterator<Item = &'a MigrationPolicy>,
    vm: &Labels,
    host: &Labels,
) -> Option<&'a MigrationPolicy> {
    policies
        .into_iter()
        .filter_map(|p| p.matches(vm, host).map(|s| (p, s)))
        .min_by(|(pa, a), (pb, b)| {
            (Reverse(a.labels), &a.keys, &pa.name).cmp(&(Reverse(b.labels), &b.keys, &pb.name))
        })
        .map(|(p, _)| p)
}

/// What one migration runs with: the host's `defaults`, overridden by the
/// fields the applicable `policy` sets, overridden by the migration's own
/// options (`migratectl migrate --...` / the API request).
pub fn effective(
    defaults: &MigrationDefaults,
    policy: Option<&MigrationPolicy>,
    overrides: &MigrationOverrides,
) -> MigrationConfiguration {
    let mut merged = overrides.clone();
    if let Some(p) = policy {
        merged.allow_auto_converge = merged.allow_auto_converge.or(p.allow_auto_converge);
        merged.allow_post_copy = merged.allow_post_copy.or(p.allow_post_copy);
        merged.bandwidth_per_migration =
            merged.bandwidth_per_migration.or(p.bandwidth_per_migration);
        merged.completion_timeout_per_gib = merged
            .completion_timeout_per_gib
            .or(p.completion_timeout_per_gib);
    }
    defaults.resolve(&merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn policy(name: &str, vm: &[(&str, &str)], host: &[(&str, &str)]) -> MigrationPolicy {
        MigrationPolicy {
            name: name.into(),
            vm_selector: labels(vm),
            host_selector: labels(host),
            ..Default::default()
        }
    }

    const KUBEVIRT: &str = r#"
apiVersion: migrations.kubevirt.io/v1alpha1
kind: MigrationPolicy
metadata: {name: production-db}
spec:
  allowAutoConverge: true
  bandwidthPerMigration: 64Mi
  completionTimeoutPerGiB: 100
  allowPostCopy: false
  selectors:
    namespaceSelector: {hpc-workloads: "True"}
    virtualMachineInstanceSelector: {kubevirt.io/environment: production}
"#;

    #[test]
    fn kubevirt_yaml_as_written() {
        let p = parse_policy(KUBEVIRT).unwrap();
        assert_eq!(
            p,
            MigrationPolicy {
                name: "production-db".into(),
                vm_selector: labels(&[("kubevirt.io/environment", "production")]),
                host_selector: labels(&[("hpc-workloads", "True")]),
                allow_auto_converge: Some(true),
                bandwidth_per_migration: Some(Quantity::mib(64)),
                completion_timeout_per_gib: Some(100),
                allow_post_copy: Some(false),
            }
        );
    }

    #[test]
    fn native_form_round_trips_through_yaml_and_json() {
        let p = parse_policy(KUBEVIRT).unwrap();
        let yaml = serde_norway::to_string(&p).unwrap();
        assert!(yaml.contains("vmSelector"), "{yaml}");
        assert_eq!(parse_policy(&yaml).unwrap(), p);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(parse_policy(&json).unwrap(), p);
        assert_eq!(serde_json::from_str::<MigrationPolicy>(&json).unwrap(), p);
    }

    #[test]
    fn several_documents() {
        let text = format!("{KUBEVIRT}---\nname: any\nallowPostCopy: true\n---\n");
        let all = parse_policies(&text).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(
            all[1],
            MigrationPolicy {
                name: "any".into(),
                allow_post_copy: Some(true),
                ..Default::default()
            }
        );
        assert!(matches!(
            parse_policy(&text),
            Err(ParsePolicyError::Field { .. })
        ));
        assert!(matches!(
            parse_policies("---\n"),
            Err(ParsePolicyError::Empty)
        ));
    }

    #[test]
    fn unknown_fields_are_named() {
        let e = parse_policy("name: a\nallowPostcopy: true\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("allowPostcopy"), "{msg}");
        let e = parse_policy(&KUBEVIRT.replace("allowPostCopy", "allowWorkloadDisruption"))
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("spec") && msg.contains("allowWorkloadDisruption"),
            "{msg}"
        );
        let e = parse_policy(&KUBEVIRT.replace("namespaceSelector", "nodeSelector")).unwrap_err();
        assert!(e.to_string().contains("nodeSelector"), "{e}");
    }

    #[test]
    fn wrong_kind_and_version_are_refused() {
        let e = parse_policy(&KUBEVIRT.replace("v1alpha1", "v1")).unwrap_err();
        assert!(matches!(e, ParsePolicyError::ApiVersion { .. }), "{e}");
        let e = parse_policy(&KUBEVIRT.replace("kind: MigrationPolicy", "kind: Pod")).unwrap_err();
        assert!(matches!(e, ParsePolicyError::Kind { .. }), "{e}");
    }

    #[test]
    fn bad_selector_syntax_says_what_to_write() {
        let e = parse_policy("name: a\nvmSelector: {\"bad key\": x}\n").unwrap_err();
        let chain = crate::error_chain(&e);
        assert!(
            chain.contains("\"bad key\"") && chain.contains("[prefix/]name"),
            "{chain}"
        );
        let e = parse_policy("name: a\nhostSelector: {Example.com/x: y}\n").unwrap_err();
        assert!(crate::error_chain(&e).contains("hostSelector"), "{e}");
        let e = parse_policy("name: a\nvmSelector: {env: -prod}\n").unwrap_err();
        assert!(crate::error_chain(&e).contains("value \"-prod\""), "{e}");
        // An unquoted YAML boolean is not a label value.
        let e = parse_policy("name: a\nvmSelector: {hpc: True}\n").unwrap_err();
        assert!(e.to_string().contains("quote it"), "{e}");
        let e = parse_policy("name: Bad_Name\n").unwrap_err();
        assert!(matches!(e, ParsePolicyError::Invalid { .. }), "{e}");
        let e = parse_policy("name: a\ncompletionTimeoutPerGiB: 0\n").unwrap_err();
        assert!(matches!(e, ParsePolicyError::Invalid { .. }), "{e}");
        let e = parse_policy("name: a\nbandwidthPerMigration: lots\n").unwrap_err();
        assert!(e.to_string().contains("bandwidthPerMigration"), "{e}");
    }

    #[test]
    fn label_key_syntax() {
        for ok in ["app", "kubevirt.io/environment", "a.b-c_d", "x/y", "A9"] {
            assert!(label_key_ok(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "a/b/c",
            "Example.com/x",
            "/x",
            "x/",
            &"a".repeat(64),
        ] {
            assert!(!label_key_ok(bad), "{bad}");
        }
    }

    #[test]
    fn more_matching_labels_win() {
        let p1 = policy("p1", &[("env", "production")], &[]);
        let p2 = policy("p2", &[("env", "production"), ("tier", "db")], &[]);
        let vm = labels(&[("env", "production"), ("tier", "db")]);
        let host = Labels::new();
        assert_eq!(select_policy([&p1, &p2], &vm, &host).unwrap().name, "p2");
        assert_eq!(select_policy([&p2, &p1], &vm, &host).unwrap().name, "p2");
        // Host labels count too.
        let p3 = policy("p3", &[("env", "production")], &[("rack", "r1")]);
        let p4 = policy("p4", &[("env", "production")], &[]);
        let host = labels(&[("rack", "r1")]);
        assert_eq!(select_policy([&p4, &p3], &vm, &host).unwrap().name, "p3");
    }

    #[test]
    fn ties_go_to_the_alphabetically_first_keys() {
        let p3 = policy("p3", &[("app", "web")], &[]);
        let p4 = policy("p4", &[("zone", "a")], &[]);
        let vm = labels(&[("app", "web"), ("zone", "a")]);
        assert_eq!(
            select_policy([&p4, &p3], &vm, &Labels::new()).unwrap().name,
            "p3"
        );
        // Same keys: the name decides, whatever the listing order.
        let a = policy("zz", &[("app", "web")], &[]);
        let b = policy("aa", &[], &[("app", "web")]);
        let both = labels(&[("app", "web")]);
        assert_eq!(select_policy([&a, &b], &both, &both).unwrap().name, "aa");
        assert_eq!(select_policy([&b, &a], &both, &both).unwrap().name, "aa");
    }

    #[test]
    fn an_empty_policy_matches_everything_and_loses_to_any_other() {
        let all = policy("catch-all", &[], &[]);
        let web = policy("web", &[("app", "web")], &[]);
        let vm = labels(&[("app", "web")]);
        assert_eq!(
            select_policy([&all, &web], &vm, &Labels::new())
                .unwrap()
                .name,
            "web"
        );
        let other = labels(&[("app", "db")]);
        assert_eq!(
            select_policy([&all, &web], &other, &Labels::new())
                .unwrap()
                .name,
            "catch-all"
        );
        assert!(select_policy([&web], &other, &Labels::new()).is_none());
    }

    #[test]
    fn effective_layers_defaults_policy_and_options() {
        let defaults = MigrationDefaults::default();
        let p = parse_policy(KUBEVIRT).unwrap();
        let none = MigrationOverrides::default();
        assert_eq!(effective(&defaults, None, &none), defaults.resolve(&none));
        let c = effective(&defaults, Some(&p), &none);
        assert!(c.allow_auto_converge);
        assert!(!c.allow_post_copy);
        assert_eq!(c.bandwidth_per_migration, Quantity::mib(64));
        assert_eq!(c.completion_timeout_per_gib, 100);
        assert_eq!(c.progress_timeout, defaults.progress_timeout);
        let o = MigrationOverrides {
            allow_auto_converge: Some(false),
            completion_timeout_per_gib: Some(7),
            ..Default::default()
        };
        let c = effective(&defaults, Some(&p), &o);
        assert!(!c.allow_auto_converge);
        assert_eq!(c.completion_timeout_per_gib, 7);
        assert_eq!(c.bandwidth_per_migration, Quantity::mib(64));
        // post_copy_now still implies post-copy over a policy's "no".
        let o = MigrationOverrides {
            post_copy_now: true,
            ..Default::default()
        };
        assert!(effective(&defaults, Some(&p), &o).allow_post_copy);
    }

    fn arb_labels() -> impl Strategy<Value = Labels> {
        prop::collection::btree_map(
            prop::sample::select(vec!["app", "env", "tier", "zone", "kubevirt.io/x"])
                .prop_map(String::from),
            prop::sample::select(vec!["a", "b"]).prop_map(String::from),
            0..4,
        )
    }

    fn arb_policy() -> impl Strategy<Value = MigrationPolicy> {
        ("[a-e]{1,2}", arb_labels(), arb_labels()).prop_map(|(name, vm, host)| MigrationPolicy {
            name,
            vm_selector: vm,
            host_selector: host,
            ..Default::default()
        })
    }

    proptest! {
        #[test]
        fn chosen_policy_matches_and_none_matches_more(
            policies in prop::collection::vec(arb_policy(), 0..8),
            vm in arb_labels(),
            host in arb_labels(),
        ) {
            // Policy names are unique in a store (they are its keys).
            let mut policies = policies;
            policies.sort_by(|a, b| a.name.cmp(&b.name));
            policies.dedup_by(|a, b| a.name == b.name);
            let chosen = select_policy(&policies, &vm, &host);
            let best = policies.iter().filter_map(|p| p.matches(&vm, &host)).map(|s| s.labels).max();
            match chosen {
                None => prop_assert!(best.is_none()),
                Some(p) => {
                    let score = p.matches(&vm, &host);
                    prop_assert!(score.is_some(), "chosen policy does not match");
                    prop_assert_eq!(Some(score.unwrap().labels), best);
                }
            }
            // The listing order never changes the choice.
            let mut reversed = policies.clone();
            reversed.reverse();
            prop_assert_eq!(select_policy(&reversed, &vm, &host), chosen);
        }
    }
}
