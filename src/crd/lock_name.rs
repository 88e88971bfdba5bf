//! Deterministic StateLock object names derived from DynamoDB LockIDs.

use sha2::{Digest, Sha256};

/// Longest name produced: a DNS-1123 label.
pub const MAX_NAME_LEN: usize = 63;
/// Characters of the hash suffix (5 bits each, so 50 bits of SHA-256).
pub const HASH_CHARS: usize = 10;
const SLUG_MAX: usize = MAX_NAME_LEN - 1 - HASH_CHARS;
const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// The StateLock name for a LockID: a readable slug of the path plus a hash of the whole LockID.
///
/// - Always a valid DNS-1123 label (lowercase alphanumerics and `-`, starts and ends with an
///   alphanumeric, at most 63 characters), for every string DynamoDB accepts as a key (up to 2048
///   bytes of any Unicode), including the empty string.
/// - Deterministic: the same LockID gives the same name in every process and release, so an
///   operator restart finds the objects it created.
/// - The slug is the LockID lowercased, with the ubiquitous `terraform.tfstate` / `.tfstate` suffix
///   dropped and every run of other characters turned into one `-`; when too long, its *end* is
///   kept, because that is where keys differ (the bucket prefix is usually the same for all).
/// - The suffix is the first 50 bits of SHA-256 over the LockID's UTF-8 bytes, base32-encoded.
///   Two different LockIDs share a name only if those 50 bits collide. Among `n` locks held at once
///   in one namespace (only held locks have objects) the chance of any collision is about
///   `n² / 2^51`: 4.4e-10 for 1,000 locks, 4.4e-6 for 100,000. The mirror still compares
///   `spec.lockId` before it touches an existing object, so a collision is reported, never merged.
pub fn state_lock_name(lock_id: &str) -> String {
    let digest = Sha256::digest(lock_id.as_bytes());
    let hash = base32_prefix(&digest, HASH_CHARS);

    let trimmed = lock_id.strip_suffix("/terraform.tfstate").or_else(|| lock_id.strip_suffix(".tfstate")).unwrap_or(lock_id);
    let mut slug = String::with_capacity(trimmed.len().min(256));
    for c in trimmed.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            slug.push(c);
        } else if !slug.ends_with('-') {
            slug.push('-');
        }
    }
    // Keep the end, then drop separators left at either edge.
    let start = slug.len().saturating_sub(SLUG_MAX);
    let slug = slug[start..].trim_matches('-');
    if slug.is_empty() { format!("lock-{hash}") } else { format!("{slug}-{hash}") }
}

fn base32_prefix(bytes: &[u8], chars: usize) -> String {
    let mut out = String::with_capacity(chars);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 && out.len() < chars {
            bits -= 5;
            out.push(BASE32[((acc >> bits) & 31) as usize] as char);
        }
        acc &= (1 << bits) - 1;
        if out.len() == chars {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn is_dns1123_label(s: &str) -> bool {
        let b = s.as_bytes();
        !b.is_empty()
            && b.len() <= 63
            && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
    }

    #[test]
    fn readable_names_for_typical_lock_ids() {
        let name = state_lock_name("tfstate/prod/network/terraform.tfstate");
        assert!(name.starts_with("tfstate-prod-network-"), "{name}");
        assert_eq!(name.len(), "tfstate-prod-network-".len() + HASH_CHARS);
        let ws = state_lock_name("tfstate/env:/dev/app.tfstate");
        assert!(ws.starts_with("tfstate-env-dev-app-"), "{ws}");
    }

    #[test]
    fn the_same_lock_id_always_gives_the_same_name() {
        // Pinned: a change here renames every object in every cluster on upgrade. The expected
        // value is Python's base64.b32encode(sha256(id))[:10].lower(), an independent encoder.
        assert_eq!(state_lock_name("tfstate/demo/terraform.tfstate"), state_lock_name("tfstate/demo/terraform.tfstate"));
        assert_eq!(state_lock_name("tfstate/demo/terraform.tfstate"), "tfstate-demo-qo5it3jbmr");
    }

    #[test]
    fn lock_and_digest_items_and_case_variants_get_distinct_names() {
        let a = state_lock_name("b/Key/terraform.tfstate");
        let b = state_lock_name("b/key/terraform.tfstate");
        let c = state_lock_name("b/key/terraform.tfstate-md5");
        assert_ne!(a, b);
        assert_ne!(b, c);
    }

    #[test]
    fn edge_case_lock_ids_map_to_valid_names() {
        let long = "x".repeat(2048);
        let unicode = "ü".repeat(1024);
        for id in ["", "-", "///", "ü", "ÄÖÜ/😀", "a", long.as_str(), unicode.as_str(), "tfstate/terraform.tfstate", "\u{0}\n\t"] {
            let name = state_lock_name(id);
            assert!(is_dns1123_label(&name), "{id:?} -> {name:?}");
        }
    }

    proptest! {
        #[test]
        fn every_lock_id_maps_to_a_dns1123_label(id in any::<String>()) {
            let name = state_lock_name(&id);
            prop_assert!(is_dns1123_label(&name), "{:?} -> {:?}", id, name);
            prop_assert_eq!(name, state_lock_name(&id));
        }

        #[test]
        fn long_ascii_paths_keep_their_distinguishing_end(prefix in "[a-z]{60,200}", tail in "[a-z]{1,20}") {
            let name = state_lock_name(&format!("{prefix}/{tail}/terraform.tfstate"));
            let expected_tail = format!("-{tail}-");
            prop_assert!(name.contains(&expected_tail));
        }
    }
}
