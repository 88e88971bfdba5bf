//! The hostname a process in a pod sees (what Terraform writes after the `@` in `Who`), derived
//! exactly as the kubelet derives it. Pure.
//!
//! The kubelet (`GeneratePodHostNameAndDomain`, `truncatePodHostnameIfNeeded`):
//! - the hostname is `spec.hostname` when set, else the pod name;
//! - longer than 63 characters, it is cut to 63 and trailing `-` and `.` are trimmed;
//! - with `spec.subdomain` the pod's domain is `<subdomain>.<namespace>.svc.<cluster domain>`, and
//!   with `spec.setHostnameAsFQDN` the hostname becomes `<hostname>.<domain>` (the cluster domain is
//!   the kubelet's setting, not visible in the API: any non-empty one is accepted);
//! - a `hostNetwork` pod sees its node's hostname: it can never be named by a pod-like hostname.

/// What the API says about a pod that decides its hostname.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostnameSpec {
    pub namespace: String,
    pub name: String,
    /// `spec.hostname`, when set and non-empty.
    pub hostname: Option<String>,
    /// `spec.subdomain`, when set and non-empty.
    pub subdomain: Option<String>,
    /// `spec.setHostnameAsFQDN`.
    pub set_hostname_as_fqdn: bool,
    /// `spec.hostNetwork`.
    pub host_network: bool,
}

/// The kubelet's hostname limit (a Linux hostname is at most 64 bytes with its terminator).
pub const MAX_HOSTNAME: usize = 63;

impl HostnameSpec {
    /// The short hostname the kubelet gives the pod, or `None` for a host-network pod (whose
    /// hostname is its node's).
    pub fn short_hostname(&self) -> Option<&str> {
        if self.host_network {
            return None;
        }
        let base = self.hostname.as_deref().unwrap_or(&self.name);
        // Names are ASCII (DNS-1123), but never slice inside a character of a hostile one.
        let trimmed =
            if base.len() <= MAX_HOSTNAME { base } else { crate::lock_record::truncate(base, MAX_HOSTNAME).trim_end_matches(['-', '.']) };
        (!trimmed.is_empty()).then_some(trimmed)
    }

    /// Whether a process in this pod would report `host` as its hostname.
    pub fn yields(&self, host: &str) -> bool {
        let Some(short) = self.short_hostname() else { return false };
        match (&self.subdomain, self.set_hostname_as_fqdn) {
            (Some(sub), true) => {
                // `<short>.<subdomain>.<namespace>.svc.<cluster domain>`
                let domain = [short, sub.as_str(), self.namespace.as_str(), "svc"]
                    .iter()
                    .try_fold(host, |rest, label| rest.strip_prefix(label)?.strip_prefix('.'));
                domain.is_some_and(|domain| !domain.is_empty() && !domain.starts_with('.') && !domain.ends_with('.'))
            }
            _ => host == short,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pod(name: &str) -> HostnameSpec {
        HostnameSpec { namespace: "ci".into(), name: name.into(), ..HostnameSpec::default() }
    }

    #[test]
    fn the_kubelets_rules() {
        let long = "gitlab-runner-runner-7d9f8c6b5-x2abc-project-12345-concurrent-0-abcdef";
        assert!(long.len() > 63);
        let cut = &long[..63];
        let (a62, a61) = ("a".repeat(62), "a".repeat(61));
        let cases: Vec<(&str, HostnameSpec, &str, bool)> = vec![
            ("plain name", pod("atlantis-0"), "atlantis-0", true),
            ("another name", pod("atlantis-0"), "atlantis-1", false),
            ("long name truncated to 63", pod(long), cut, true),
            ("long name is not its own hostname", pod(long), long, false),
            // 62 characters then a '-' at position 63: the trailing '-' is trimmed.
            ("trailing dash trimmed", pod(&format!("{}-{}", "a".repeat(62), "bcd")), &a62, true),
            ("trailing dots and dashes trimmed", pod(&format!("{}.-{}", "a".repeat(61), "bcd")), &a61, true),
            ("spec.hostname wins", HostnameSpec { hostname: Some("runner".into()), ..pod("atlantis-0") }, "runner", true),
            (
                "spec.hostname: the name is not the hostname",
                HostnameSpec { hostname: Some("runner".into()), ..pod("atlantis-0") },
                "atlantis-0",
                false,
            ),
            ("subdomain alone changes nothing", HostnameSpec { subdomain: Some("tf".into()), ..pod("atlantis-0") }, "atlantis-0", true),
            (
                "FQDN with any cluster domain",
                HostnameSpec { subdomain: Some("tf".into()), set_hostname_as_fqdn: true, ..pod("atlantis-0") },
                "atlantis-0.tf.ci.svc.cluster.local",
                true,
            ),
            (
                "FQDN: the short name is not the hostname",
                HostnameSpec { subdomain: Some("tf".into()), set_hostname_as_fqdn: true, ..pod("atlantis-0") },
                "atlantis-0",
                false,
            ),
            (
                "FQDN of another namespace",
                HostnameSpec { subdomain: Some("tf".into()), set_hostname_as_fqdn: true, ..pod("atlantis-0") },
                "atlantis-0.tf.other.svc.cluster.local",
                false,
            ),
            (
                "FQDN without a cluster domain",
                HostnameSpec { subdomain: Some("tf".into()), set_hostname_as_fqdn: true, ..pod("atlantis-0") },
                "atlantis-0.tf.ci.svc.",
                false,
            ),
            (
                "setHostnameAsFQDN without subdomain is the short name",
                HostnameSpec { set_hostname_as_fqdn: true, ..pod("atlantis-0") },
                "atlantis-0",
                true,
            ),
            (
                "host network: the node's hostname, never the pod's",
                HostnameSpec { host_network: true, ..pod("atlantis-0") },
                "atlantis-0",
                false,
            ),
        ];
        for (what, spec, host, want) in cases {
            assert_eq!(spec.yields(host), want, "{what}: {spec:?} vs {host}");
        }
    }

    proptest! {
        /// Whatever the name, the hostname is at most 63 bytes, never ends in '-' or '.', is a
        /// prefix of the name, and a hostile (non-ASCII) name never panics.
        #[test]
        fn truncation_is_bounded_and_a_prefix(name in "[a-z0-9][a-z0-9.-]{0,252}|\\PC{0,300}") {
            if let Some(h) = pod(&name).short_hostname() {
                prop_assert!(h.len() <= MAX_HOSTNAME);
                prop_assert!(name.starts_with(h));
                if name.len() > MAX_HOSTNAME {
                    prop_assert!(!h.ends_with('-') && !h.ends_with('.'));
                }
                prop_assert!(pod(&name).yields(h));
            }
        }
    }
}
