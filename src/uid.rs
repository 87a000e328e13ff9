//! The uid rule, which every input naming a user follows: login, `to`, token subjects, the
//! HTTP API and frames from peers.

/// Largest uid, in bytes of UTF-8.
pub const MAX_UID_BYTES: usize = 128;

/// The one sender id that is not a uid: messages pushed through the backend API.
pub const SYSTEM_SENDER: &str = "$system";

/// Checks the uid rule: 1 to 128 bytes of UTF-8; no control (Cc) or format (Cf: zero-width,
/// bidi overrides) characters; not only whitespace; and, after NFKC normalization, no leading
/// `$` (reserved for system senders, so `＄system` is refused as well as `$system`).
///
/// The uid is checked, never rewritten: `alice` and a look-alike stay two different uids, and
/// what a client sends is exactly what other clients see. Room ids follow the same rule.
///
/// # Errors
/// A human message saying which part of the rule is broken.
pub fn validate_uid(uid: &str) -> Result<(), &'static str> {
    use icu_properties::CodePointMapData;
    use icu_properties::props::GeneralCategory;
    if uid.is_empty() {
        return Err("uid must not be empty");
    }
    if uid.len() > MAX_UID_BYTES {
        return Err("uid must be at most 128 bytes");
    }
    if uid.chars().any(char::is_control) {
        return Err("uid must not contain control characters");
    }
    let category = CodePointMapData::<GeneralCategory>::new();
    if uid
        .chars()
        .any(|c| category.get(c) == GeneralCategory::Format)
    {
        return Err("uid must not contain format characters (zero-width or bidi controls)");
    }
    if uid.chars().all(char::is_whitespace) {
        return Err("uid must not be only whitespace");
    }
    let normalized = icu_normalizer::ComposingNormalizerBorrowed::new_nfkc().normalize(uid);
    if normalized.starts_with('$') {
        return Err(
            "uids starting with `$` (after NFKC normalization) are reserved for system senders",
        );
    }
    Ok(())
}

/// Checks the sender of a message from a peer node: a uid, or exactly [`SYSTEM_SENDER`].
///
/// # Errors
/// As [`validate_uid`].
pub fn validate_sender(from: &str) -> Result<(), &'static str> {
    if from == SYSTEM_SENDER {
        Ok(())
    } else {
        validate_uid(from)
    }
}
