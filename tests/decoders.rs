//! Property tests for every decoder that reads bytes from outside the process: client
//! WebSocket frames ([`imgate::protocol::parse_client_frame`], `oversize_answer`), peer
//! frames over QUIC ([`imgate::wire::decode`], the length-delimited codec configured as in
//! `peer.rs`, `check_preamble`), gossip datagrams ([`imgate::gossip::Sealer::open`]), the
//! configuration file ([`imgate::config::Config::parse`] and `validate`) and tokens
//! ([`imgate::auth::TokenKeys::verify`]).
//!
//! Each property feeds arbitrary input (random text and bytes, JSON-ish frames with duplicate
//! keys, wrong types and deep nesting, crafted huge length prefixes, mutated copies of
//! `cluster.toml`, forged JWTs) and checks that the decoder returns `Ok` or `Err` without
//! panicking, that what it accepts follows the protocol rules, and that the memory it
//! allocates stays under a fixed bound.
//!
//! # Allocation bounds
//!
//! A counting global allocator keeps, per thread, the bytes currently allocated and the peak
//! since a reset; [`peak_during`] returns the peak extra bytes a call allocated on this thread
//! (proptest runs the cases on the test thread, so other threads do not disturb it). Every
//! bound is "a small multiple of the input length plus a constant", so an input can never
//! make a decoder allocate for a length it merely *claims*:
//!
//! - client frames: `8 × len + 64 KiB`. `serde_json` borrows the envelope's fields as raw
//!   JSON, so a call copies the input at most a few times (the `type`, `id` and `to` strings,
//!   the body text and its `Arc`, an error message quoting a bit of it). Measured: at most
//!   `2 × len + 11.5 KiB` (493 591 bytes for a 246 826-byte `send` whose body is accepted:
//!   the body is copied into a `String`, then into its `Arc`); `oversize_answer` at most
//!   `2 × len + 236`.
//!   The bound leaves 4× on the slope and 64 KiB for allocator and library details.
//! - peer frames: `MAX_FRAME + 8 × len + 64 KiB`. bincode checks a claimed string length
//!   against its size limit ([`imgate::wire::MAX_FRAME`], 1 MiB) and then allocates it before
//!   reading (`vec![0; len]`): a 46-byte frame claiming just under 1 MiB cost 1 045 804 bytes
//!   for an instant, never more than the limit. A length over the limit (4 GB, 2^64 - 1) is
//!   refused before any allocation: for those the bound is `8 × len + 64 KiB`, no
//!   `MAX_FRAME` term (measured: at most 108 bytes). Valid frames: at most 176 bytes. The
//!   length-delimited codec likewise reserves at most `MAX_FRAME`.
//! - configuration: `64 × len + 256 KiB` (a TOML document tree is several times its text).
//!   Measured: at most `12 × len + 28 KiB` (48 104 bytes for a 1 642-byte file). The file is
//!   local, read once at start; the bound is there to catch a blow-up, not to be tight.
//! - tokens: `8 × len + 64 KiB` (base64 decoding, JSON of header and claims, error text).
//!   Measured: at most `2 × len` (774 bytes for a 1 120-byte token).
//!
//! The measured peaks are printed by the `*_measured_peaks` tests (`--nocapture`).
//!
//! One panic was found this way (an unchecked addition in `Config::validate`, reachable from
//! `cluster.toml`); `config_validate_huge_queue_sum_is_refused_without_overflow` keeps it
//! fixed. `token_keys_with_huge_ttl_or_leeway_do_not_panic` keeps the second one fixed:
//! `TokenKeys` built directly with a huge `ttl_s` or `leeway_s` (now clamped).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fmt::Write as _;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use hmac::{Hmac, Mac};
use imgate::auth::{TokenError, TokenKeys, unix_now, validate_uid};
use imgate::config::Config;
use imgate::gossip::Sealer;
use imgate::protocol::{
    ClientFrame, FailReason, MAX_ID_BYTES, oversize_answer, parse_client_frame,
};
use imgate::wire::{self, MAX_FRAME, PeerFrame, VERSION, WireMessage, WireOutcome};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use sha2::Sha256;

// ---------------------------------------------------------------------------------------
// Counting allocator
// ---------------------------------------------------------------------------------------

/// `System`, counting per thread. The counters are `const`-initialized `Cell`s without a
/// destructor, so reaching them never allocates (and `try_with` keeps thread teardown safe).
struct Counting;

thread_local! {
    /// Bytes allocated and not yet freed by this thread (signed: a thread may free memory
    /// another thread allocated).
    static CURRENT: Cell<isize> = const { Cell::new(0) };
    /// Highest `CURRENT` since the last reset.
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note_alloc(bytes: usize) {
    let _ = CURRENT.try_with(|current| {
        let now = current.get().saturating_add_unsigned(bytes);
        current.set(now);
        let _ = PEAK.try_with(|peak| {
            if now > peak.get() {
                peak.set(now);
            }
        });
    });
}

fn note_free(bytes: usize) {
    let _ = CURRENT.try_with(|current| current.set(current.get().saturating_sub_unsigned(bytes)));
}

// SAFETY: every call is forwarded to `System` unchanged; the bookkeeping only touches
// thread-local `Cell`s and never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            note_alloc(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            note_alloc(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) };
        note_free(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            // Counted as "new block, then old block freed": a moving realloc holds both.
            note_alloc(new_size);
            note_free(layout.size());
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result and the peak number of bytes allocated on this thread
/// during the call, over what was allocated before it (the result's own heap included).
fn peak_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = CURRENT.with(Cell::get);
    PEAK.with(|peak| peak.set(base));
    let result = f();
    let peak = PEAK.with(Cell::get);
    (result, usize::try_from(peak - base).unwrap_or(0))
}

/// Largest peak seen by a property, for the `*_measured_peaks` tests' report.
#[derive(Debug, Default, Clone, Copy)]
struct Worst {
    /// Largest `peak - slope × len` seen: the constant a bound needs for this slope.
    over_slope: usize,
    /// Largest peak seen.
    peak: usize,
    /// Input length of that peak.
    len: usize,
}

impl Worst {
    fn note(&mut self, len: usize, peak: usize, slope: usize) {
        self.over_slope = self.over_slope.max(peak.saturating_sub(slope * len));
        if peak > self.peak {
            self.peak = peak;
            self.len = len;
        }
    }
}

/// `cases` per property, unless `PROPTEST_CASES` asks for another number (for a longer
/// search: `PROPTEST_CASES=20000 cargo test --release --test decoders`). No persistence file.
fn config(cases: u32) -> ProptestConfig {
    let default = ProptestConfig::default();
    ProptestConfig {
        cases: if std::env::var_os("PROPTEST_CASES").is_some() {
            default.cases
        } else {
            cases
        },
        failure_persistence: None,
        ..default
    }
}

const KIB: usize = 1024;

// ---------------------------------------------------------------------------------------
// The allocator itself
// ---------------------------------------------------------------------------------------

#[test]
fn counting_allocator_sees_allocations_on_this_thread() {
    let ((), peak) = peak_during(|| {
        let v = vec![1u8; 1 << 20];
        std::hint::black_box(&v);
    });
    assert!((1 << 20..(1 << 20) + 4096).contains(&peak), "{peak}");
    let (v, peak) = peak_during(|| {
        let mut v = Vec::new();
        for i in 0..10_000u32 {
            v.push(i);
        }
        v
    });
    assert!(peak >= v.capacity() * 4, "{peak}");
    // Another thread's allocations are not ours.
    let ((), peak) = peak_during(|| {
        std::thread::scope(|s| {
            s.spawn(|| std::hint::black_box(vec![0u8; 8 << 20]));
        });
    });
    assert!(peak < 1 << 20, "{peak}");
}

// ---------------------------------------------------------------------------------------
// Client frames
// ---------------------------------------------------------------------------------------

/// Peak bound of one `parse_client_frame` call on `len` bytes. Measured: at most
/// `2 × len + 11.5 KiB` (the body and its `Arc` copy; see the module doc).
fn frame_bound(len: usize) -> usize {
    8 * len + 64 * KIB
}

/// A JSON string literal: valid escapes of arbitrary text, or raw text between quotes
/// (invalid escapes, lone surrogates, control characters).
fn json_string() -> BoxedStrategy<String> {
    prop_oneof![
        4 => any::<String>().prop_map(|s| serde_json::to_string(&s).expect("strings encode")),
        2 => "[a-z0-9 _$.-]{0,20}".prop_map(|s| format!("\"{s}\"")),
        1 => r#"[a-z\\"\x00-\x1f]{0,12}"#.prop_map(|s| format!("\"{s}\"")),
        1 => prop::sample::select(vec![
            r#""\ud800""#, r#""\udfff\ud800""#, r#""\u0000""#, r#""\uZZZZ""#, r#""\""#,
            r#""$system""#, r#""＄system""#, "\"a\u{200b}b\"", "\"\u{202e}evil\"",
            "\"   \"", r#""""#,
        ])
        .prop_map(String::from),
    ]
    .boxed()
}

/// A JSON scalar, or something that looks like one: numbers of every size and kind (and a
/// few that JSON does not allow).
fn json_leaf() -> BoxedStrategy<String> {
    prop_oneof![
        1 => Just("null".to_string()),
        1 => any::<bool>().prop_map(|b| b.to_string()),
        2 => any::<i64>().prop_map(|n| n.to_string()),
        2 => any::<u64>().prop_map(|n| n.to_string()),
        1 => any::<f64>().prop_map(|f| {
            if f.is_finite() { format!("{f:e}") } else { "1e999".to_string() }
        }),
        2 => prop::sample::select(vec![
            "0", "-0", "-1", "1.0", "1e400", "-1e400", "1E+2", "0.0000001",
            "18446744073709551615", "18446744073709551616", "-9223372036854775809",
            "340282366920938463463374607431768211456", "01", "1.", ".5", "+1", "NaN",
            "Infinity", "0x10", "1_000", "tru", "nul",
        ])
        .prop_map(String::from),
        4 => json_string(),
    ]
    .boxed()
}

/// Object keys: the envelope's fields (so duplicates happen) and random ones.
fn json_key() -> BoxedStrategy<String> {
    prop_oneof![
        3 => prop::sample::select(vec!["type", "id", "to", "seq", "body", "token", "room", "from"])
            .prop_map(|k| format!("\"{k}\"")),
        1 => json_string(),
    ]
    .boxed()
}

/// A JSON value (as text) nested a few levels, with duplicate keys.
fn json_value() -> BoxedStrategy<String> {
    json_leaf()
        .prop_recursive(6, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6)
                    .prop_map(|v| format!("[{}]", v.join(","))),
                prop::collection::vec((json_key(), inner), 0..6).prop_map(|kv| {
                    let fields: Vec<String> =
                        kv.into_iter().map(|(k, v)| format!("{k}:{v}")).collect();
                    format!("{{{}}}", fields.join(","))
                }),
            ]
        })
        .boxed()
}

/// A valid JSON value (as text): what a well-behaved client sends as a body.
fn valid_json() -> BoxedStrategy<String> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        any::<String>().prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map("\\PC{0,8}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
    .prop_map(|v| v.to_string())
    .boxed()
}

/// Values for a field that are often of the right kind (so frames get past the first
/// check) and otherwise anything.
fn field_value(field: &'static str) -> BoxedStrategy<String> {
    let right_kind: BoxedStrategy<String> = match field {
        "id" => prop_oneof![
            "[a-z0-9]{0,70}".prop_map(|s| format!("\"{s}\"")),
            // Multi-byte characters around the 64-byte limit.
            (0usize..=40).prop_map(|n| format!("\"{}\"", "é".repeat(n))),
        ]
        .boxed(),
        "to" => prop_oneof![
            "[a-zA-Z0-9 ]{0,140}".prop_map(|s| format!("\"{s}\"")),
            json_string(),
        ]
        .boxed(),
        "seq" => prop_oneof![any::<u64>().prop_map(|n| n.to_string()), json_leaf()].boxed(),
        "body" => prop_oneof![
            json_value(),
            (0usize..400).prop_map(|n| format!("\"{}\"", "x".repeat(n))),
        ]
        .boxed(),
        _ => json_leaf(),
    };
    prop_oneof![3 => right_kind, 1 => json_value()].boxed()
}

/// Writes `fields` as a JSON object, with `ws` around every token.
fn object_text(fields: &[(&str, String)], ws: &str) -> String {
    let mut text = format!("{ws}{{");
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        let _ = write!(text, "{ws}\"{k}\"{ws}:{ws}{v}");
    }
    text.push_str(ws);
    text.push('}');
    text
}

fn ws() -> BoxedStrategy<&'static str> {
    prop::sample::select(vec!["", "", " ", "\n\t ", "\r\n"]).boxed()
}

fn named(name: &'static str) -> BoxedStrategy<(&'static str, String)> {
    field_value(name).prop_map(move |v| (name, v)).boxed()
}

/// A client frame: an object with a `type` among the known ones and a few unknown ones, and
/// random `id`, `to`, `seq`, `body`, `token`, `room` fields, sometimes repeated.
fn random_frame() -> BoxedStrategy<String> {
    let ty = prop_oneof![
        6 => prop::sample::select(vec!["send", "ack", "ping", "refresh", "join", "leave", "bogus"])
            .prop_map(|t| format!("\"{t}\"")),
        1 => json_value(),
    ];
    let field = prop::sample::select(vec!["id", "to", "seq", "body", "token", "room", "type"])
        .prop_flat_map(named);
    (
        prop::option::weighted(0.95, ty),
        prop::collection::vec(field, 0..8),
        any::<prop::sample::Index>(),
        ws(),
    )
        .prop_map(|(ty, mut fields, at, ws)| {
            if let Some(ty) = ty {
                let at = at.index(fields.len() + 1);
                fields.insert(at, ("type", ty));
            }
            object_text(&fields, ws)
        })
        .boxed()
}

/// A frame that has each field its `type` needs once (of the right kind most of the time),
/// in any order, sometimes with extra or repeated fields: these reach the accepting paths.
fn plausible_frame() -> BoxedStrategy<String> {
    let ty = prop::sample::select(vec!["send", "send", "ack", "ping", "refresh", "join"]);
    let id = prop_oneof![
        3 => "\"[a-z0-9]{1,64}\"".prop_map(|v| ("id", v)),
        1 => named("id"),
    ];
    let to = prop_oneof![
        3 => "\"[a-z]{1,20}\"".prop_map(|v| ("to", v)),
        1 => named("to"),
    ];
    let body = prop_oneof![3 => valid_json().prop_map(|v| ("body", v)), 1 => named("body")];
    let extra = prop::sample::select(vec!["id", "to", "seq", "body", "token", "room", "type"])
        .prop_flat_map(named);
    (
        ty,
        id,
        to,
        body,
        named("seq"),
        named("token"),
        prop::option::weighted(0.2, extra),
        ws(),
    )
        .prop_flat_map(|(ty, id, to, body, seq, token, extra, ws)| {
            let mut fields = vec![("type", format!("\"{ty}\""))];
            match ty {
                "send" => fields.extend([id, to, body]),
                "ack" => fields.push(seq),
                "refresh" => fields.push(token),
                _ => {}
            }
            fields.extend(extra);
            Just(fields)
                .prop_shuffle()
                .prop_map(move |fields| object_text(&fields, ws))
        })
        .boxed()
}

fn frame_text() -> BoxedStrategy<String> {
    prop_oneof![random_frame(), plausible_frame()].boxed()
}

/// Deeply nested bodies and frames, closed or not.
fn deep_frame() -> BoxedStrategy<String> {
    (1usize..20_000, 0u8..6)
        .prop_map(|(depth, kind)| match kind {
            0 => format!(
                r#"{{"type":"send","id":"m","to":"bob","body":{}{}}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            ),
            1 => format!(
                r#"{{"type":"send","id":"m","to":"bob","body":{}1{}}}"#,
                r#"{"a":"#.repeat(depth),
                "}".repeat(depth)
            ),
            2 => format!(
                r#"{{"type":"send","id":"m","to":"bob","body":{}"#,
                "[".repeat(depth)
            ),
            3 => format!(
                r#"{{"type":{}"ping"{}}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            ),
            4 => format!("{{\"x\":{}", "{\"x\":".repeat(depth)),
            _ => format!(
                r#"{{"type":"ack","seq":{}0{}}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            ),
        })
        .boxed()
}

/// Large frames: a body of up to 256 KiB, over and under `max_body`.
fn big_frame() -> BoxedStrategy<String> {
    (0usize..256 * KIB, any::<bool>())
        .prop_map(|(n, escaped)| {
            let filler = if escaped { "\\u00e9" } else { "x" };
            let reps = n / filler.len();
            format!(
                r#"{{"type":"send","id":"big","to":"bob","body":"{}"}}"#,
                filler.repeat(reps)
            )
        })
        .boxed()
}

/// Runs the parser on `text`, checks what it accepts, and returns the peak allocations of
/// `parse_client_frame` and of `oversize_answer`.
fn check_client_frame(text: &str, max_body: usize) -> (usize, usize) {
    let (parsed, peak) = peak_during(|| parse_client_frame(text, max_body));
    match parsed {
        Ok(ClientFrame::Send { id, to, body, .. }) => {
            assert!(
                (1..=MAX_ID_BYTES).contains(&id.len()),
                "id of {} bytes",
                id.len()
            );
            assert!(validate_uid(&to).is_ok(), "to {to:?} accepted");
            let len = body.get().len();
            assert!(len <= max_body, "body of {len} bytes over {max_body}");
            // One JSON value (raw: no recursion limit, as the parser has none for bodies).
            serde_json::from_str::<&serde_json::value::RawValue>(body.get()).expect("body is JSON");
        }
        Ok(ClientFrame::Refresh { token }) => assert!(!token.is_empty(), "empty refresh token"),
        _ => {}
    }
    assert!(
        peak <= frame_bound(text.len()),
        "parse_client_frame allocated {peak} bytes for {} input bytes",
        text.len()
    );
    // The oversize path parses the same text with a zero body limit.
    let (_, oversize_peak) = peak_during(|| oversize_answer(text, max_body));
    assert!(
        oversize_peak <= frame_bound(text.len()),
        "oversize_answer allocated {oversize_peak}"
    );
    (peak, oversize_peak)
}

fn max_body() -> BoxedStrategy<usize> {
    prop_oneof![
        0usize..300,
        Just(usize::MAX),
        Just(64 * KIB),
        any::<usize>()
    ]
    .boxed()
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn client_frames_from_arbitrary_text(text in prop_oneof![
        any::<String>(),
        "\\PC{0,300}",
        "[{}\\[\\]\":,a-z0-9 \\\\]{0,200}",
        "\\{\"type\":\"send\"[\\PC]{0,100}",
    ], max_body in max_body()) {
        check_client_frame(&text, max_body);
    }

    #[test]
    fn client_frames_json_ish(text in frame_text(), max_body in max_body()) {
        check_client_frame(&text, max_body);
    }
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn client_frames_deeply_nested(text in deep_frame()) {
        check_client_frame(&text, 1 << 20);
    }

    #[test]
    fn client_frames_large(text in big_frame(), max_body in prop_oneof![Just(64 * KIB), Just(usize::MAX)]) {
        check_client_frame(&text, max_body);
    }
}

/// A `send` frame the generator makes is accepted when every field is right, so the
/// properties above do reach the `Ok(Send)` path.
#[test]
fn client_frame_generator_reaches_accepted_sends() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = frame_text();
    let mut sends = 0;
    for _ in 0..400 {
        let text = strategy.new_tree(&mut runner).expect("tree").current();
        if let Ok(ClientFrame::Send { .. }) = parse_client_frame(&text, 1 << 20) {
            sends += 1;
        }
    }
    assert!(sends >= 40, "only {sends} accepted sends in 400 frames");
}

#[test]
fn client_frame_measured_peaks() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut parse, mut oversize) = (Worst::default(), Worst::default());
    let strategies = [
        frame_text(),
        deep_frame(),
        big_frame(),
        any::<String>().boxed(),
    ];
    for (i, strategy) in strategies.iter().enumerate() {
        let n = if i == 0 || i == 3 { 400 } else { 20 };
        for _ in 0..n {
            let text = strategy.new_tree(&mut runner).expect("tree").current();
            let (parse_peak, oversize_peak) = check_client_frame(&text, 1 << 20);
            parse.note(text.len(), parse_peak, 2);
            oversize.note(text.len(), oversize_peak, 2);
        }
    }
    eprintln!(
        "client frames: parse_client_frame {parse:?}, oversize_answer {oversize:?} \
         (bound 8 × len + 64 KiB; over_slope is peak - 2 × len)"
    );
}

// ---------------------------------------------------------------------------------------
// Peer frames
// ---------------------------------------------------------------------------------------

/// Peak bound of one `wire::decode` call: bincode may allocate a claimed length up to its
/// limit before it finds the input short. Measured: 1 045 804 bytes for a 46-byte frame
/// claiming a string just under the limit; at most 176 bytes for valid frames.
fn wire_bound(len: usize) -> usize {
    MAX_FRAME + 8 * len + 64 * KIB
}

/// Peak bound for a claimed length over the limit: nothing for the claim. Measured: at most
/// 108 bytes.
fn wire_bound_over_limit(len: usize) -> usize {
    8 * len + 64 * KIB
}

fn decode_measured(body: &[u8]) -> (Result<PeerFrame, wire::WireError>, usize) {
    let bytes = Bytes::copy_from_slice(body);
    peak_during(move || wire::decode(bytes))
}

/// bincode 2 varint encoding of a length, as `standard()` writes it (or a non-canonical
/// wider form: decoders must cope with both).
fn varint(n: u64, form: u8) -> Vec<u8> {
    let mut out = Vec::new();
    match form {
        0 if n < 251 => out.push(n as u8),
        0 | 1 if n <= u64::from(u16::MAX) => {
            out.push(251);
            out.extend_from_slice(&(n as u16).to_le_bytes());
        }
        0..=2 if n <= u64::from(u32::MAX) => {
            out.push(252);
            out.extend_from_slice(&(n as u32).to_le_bytes());
        }
        3 => {
            // u128 marker where a u64 is expected.
            out.push(254);
            out.extend_from_slice(&u128::from(n).to_le_bytes());
        }
        _ => {
            out.push(253);
            out.extend_from_slice(&n.to_le_bytes());
        }
    }
    out
}

fn text() -> BoxedStrategy<String> {
    prop_oneof![any::<String>(), "[a-z0-9$]{0,16}", Just(String::new())].boxed()
}

fn wire_message() -> BoxedStrategy<WireMessage> {
    (text(), text(), text(), text(), any::<u64>())
        .prop_map(|(from, id, to, body, ts)| WireMessage {
            from: from.into(),
            id: id.into(),
            to: to.into(),
            body: body.into(),
            ts,
        })
        .boxed()
}

fn peer_frame() -> BoxedStrategy<PeerFrame> {
    let outcome = prop_oneof![
        Just(WireOutcome::Delivered),
        prop::sample::select(FailReason::ALL.to_vec()).prop_map(WireOutcome::Failed),
    ];
    prop_oneof![
        (text(), text()).prop_map(|(node, cluster)| PeerFrame::Hello { node, cluster }),
        (any::<u64>(), any::<u8>(), wire_message())
            .prop_map(|(tag, hops, msg)| PeerFrame::Deliver { tag, hops, msg }),
        (any::<u64>(), any::<u8>(), wire_message())
            .prop_map(|(tag, hops, msg)| PeerFrame::DeliverTransient { tag, hops, msg }),
        (any::<u64>(), outcome).prop_map(|(tag, outcome)| PeerFrame::Outcome { tag, outcome }),
        (any::<u64>(), text()).prop_map(|(req, uid)| PeerFrame::PresenceQuery { req, uid }),
        (any::<u64>(), any::<u32>())
            .prop_map(|(req, sessions)| PeerFrame::PresenceAnswer { req, sessions }),
    ]
    .boxed()
}

/// The frame body (after the 4-byte length) of `frame`.
fn encoded_body(frame: &PeerFrame) -> Vec<u8> {
    let mut buf = BytesMut::new();
    wire::encode(frame, &mut buf);
    let len = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    assert_eq!(len, buf.len() - 4, "length prefix");
    buf[4..].to_vec()
}

/// A claimed length: around the limit, far past it, or anything.
fn claimed_len() -> BoxedStrategy<u64> {
    prop_oneof![
        prop::sample::select(vec![
            MAX_FRAME as u64 - 1,
            MAX_FRAME as u64,
            MAX_FRAME as u64 + 1,
            1 << 31,
            u64::from(u32::MAX),
            1 << 32,
            1 << 40,
            u64::MAX,
            u64::MAX - 1,
        ]),
        any::<u64>(),
        64u64..MAX_FRAME as u64,
    ]
    .boxed()
}

/// A frame body that is valid up to a string length, which claims `len` bytes.
fn huge_length_frame() -> BoxedStrategy<(Vec<u8>, u64)> {
    (
        0u8..5,
        any::<u64>(),
        any::<u8>(),
        claimed_len(),
        0u8..4,
        prop::collection::vec(any::<u8>(), 0..48),
    )
        .prop_map(|(at, n, hops, len, form, tail)| {
            let mut body = vec![VERSION];
            match at {
                // Hello { node: <len> }
                0 => body.push(0),
                // Hello { node: "n", cluster: <len> }
                1 => body.extend_from_slice(&[0, 1, b'n']),
                // Deliver { tag, hops, msg.from: <len> }
                2 => {
                    body.push(1);
                    body.extend(varint(n, 0));
                    body.push(hops);
                }
                // Deliver { tag, hops, msg: { from: "a", id: "m", to: "b", body: <len> } }
                3 => {
                    body.push(1);
                    body.extend(varint(n, 0));
                    body.push(hops);
                    body.extend_from_slice(&[1, b'a', 1, b'm', 1, b'b']);
                }
                // PresenceQuery { req, uid: <len> }
                _ => {
                    body.push(3);
                    body.extend(varint(n, 0));
                }
            }
            body.extend(varint(len, form));
            body.extend(tail);
            (body, len)
        })
        .boxed()
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn peer_frames_from_arbitrary_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        versioned in any::<bool>(),
    ) {
        let mut bytes = bytes;
        if versioned {
            bytes.insert(0, VERSION);
        }
        let (_, peak) = decode_measured(&bytes);
        prop_assert!(peak <= wire_bound(bytes.len()), "{peak} bytes for {} input bytes", bytes.len());
    }

    #[test]
    fn peer_frames_round_trip(frame in peer_frame()) {
        let body = encoded_body(&frame);
        prop_assert_eq!(body[0], VERSION);
        let (back, _) = decode_measured(&body);
        prop_assert_eq!(back.expect("own encoding decodes"), frame);
    }

    #[test]
    fn peer_frames_truncated_or_extended_are_refused(
        frame in peer_frame(),
        cut in any::<prop::sample::Index>(),
        extra in prop::collection::vec(any::<u8>(), 1..16),
    ) {
        let body = encoded_body(&frame);
        // bincode is prefix-free: no strict prefix of a frame is a whole frame.
        let cut = cut.index(body.len());
        let (prefix, peak) = decode_measured(&body[..cut]);
        prop_assert!(prefix.is_err(), "prefix of {cut}/{} bytes decoded", body.len());
        prop_assert!(peak <= wire_bound(cut));
        let mut longer = body.clone();
        longer.extend_from_slice(&extra);
        let (longer, peak) = decode_measured(&longer);
        prop_assert!(longer.is_err(), "trailing bytes accepted");
        prop_assert!(peak <= wire_bound(body.len() + extra.len()));
    }

    #[test]
    fn peer_frames_with_huge_lengths_do_not_allocate_them((body, len) in huge_length_frame()) {
        let (decoded, peak) = decode_measured(&body);
        // The tail is shorter than any claimed length it could satisfy (48 bytes < 64).
        prop_assert!(decoded.is_err() || len < 64, "{decoded:?}");
        if len > MAX_FRAME as u64 {
            prop_assert!(
                peak <= wire_bound_over_limit(body.len()),
                "claimed {len}: allocated {peak} bytes"
            );
        } else {
            prop_assert!(peak <= wire_bound(body.len()), "claimed {len}: allocated {peak} bytes");
        }
    }

    /// The length-delimited codec as `peer.rs` configures it (a copy of its builder calls):
    /// a 4 GB length prefix is refused without reserving it; a frame over `MAX_FRAME` never
    /// comes out; whatever does is handed to `wire::decode`.
    #[test]
    fn peer_stream_length_prefixes_are_bounded(
        prefix in prop_oneof![
            prop::sample::select(vec![
                u32::MAX, 1 << 31, MAX_FRAME as u32 + 1, MAX_FRAME as u32, MAX_FRAME as u32 - 1, 0, 1,
            ]),
            any::<u32>(),
            0u32..64,
        ],
        rest in prop::collection::vec(any::<u8>(), 0..80),
    ) {
        use tokio_util::codec::Decoder;
        let mut stream = BytesMut::new();
        stream.extend_from_slice(&prefix.to_be_bytes());
        stream.extend_from_slice(&rest);
        let len = stream.len();
        let mut codec = tokio_util::codec::LengthDelimitedCodec::builder()
            .max_frame_length(MAX_FRAME)
            .new_codec();
        let (frames, peak) = peak_during(|| {
            let mut frames = Vec::new();
            while let Ok(Some(frame)) = codec.decode(&mut stream) {
                prop_assert!(frame.len() <= MAX_FRAME);
                frames.push(wire::decode(frame.freeze()).is_ok());
            }
            Ok(frames)
        });
        let frames = frames?;
        if prefix as usize > MAX_FRAME {
            prop_assert!(frames.is_empty());
            prop_assert!(peak <= wire_bound_over_limit(len), "prefix {prefix}: {peak} bytes");
        } else {
            prop_assert!(peak <= wire_bound(len), "prefix {prefix}: {peak} bytes");
        }
    }

    #[test]
    fn preambles(bytes in any::<[u8; 5]>()) {
        prop_assert_eq!(wire::check_preamble(&bytes).is_ok(), bytes == wire::PREAMBLE);
    }
}

#[test]
fn peer_frame_measured_peaks() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut under, mut over) = (Worst::default(), Worst::default());
    let strategy = huge_length_frame();
    for _ in 0..500 {
        let (body, len) = strategy.new_tree(&mut runner).expect("tree").current();
        let (_, peak) = decode_measured(&body);
        if len > MAX_FRAME as u64 {
            over.note(body.len(), peak, 2);
        } else {
            under.note(body.len(), peak, 2);
        }
    }
    let mut round_trip = Worst::default();
    let frames = peer_frame();
    for _ in 0..300 {
        let body = encoded_body(&frames.new_tree(&mut runner).expect("tree").current());
        let (_, peak) = decode_measured(&body);
        round_trip.note(body.len(), peak, 2);
    }
    eprintln!(
        "peer frames: claimed over the limit {over:?}; claimed under it \
         {under:?}; valid frames {round_trip:?}"
    );
    // A 4 GB string length costs nothing.
    let mut body = vec![VERSION, 1, 7, 0, 253];
    body.extend_from_slice(&(1u64 << 32).to_le_bytes());
    body.extend_from_slice(b"abc");
    let (decoded, peak) = decode_measured(&body);
    assert!(decoded.is_err());
    assert!(peak < 4 * KIB, "{peak}");
}

// ---------------------------------------------------------------------------------------
// Gossip datagrams
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(256))]

    /// Without the key nothing opens; a sealed datagram opens once, and any changed byte or
    /// other cluster id refuses it. `open` never allocates for what it refuses.
    #[test]
    fn gossip_datagrams(
        junk in prop::collection::vec(any::<u8>(), 0..300),
        payload in prop::collection::vec(any::<u8>(), 0..300),
        flip in any::<prop::sample::Index>(),
        bit in 0u8..8,
        now in 1_000_000u64..u64::MAX / 2,
    ) {
        let mut sealer = Sealer::new("secret", "cluster");
        let (opened, peak) = peak_during(|| sealer.open(now, &junk).is_ok());
        prop_assert!(!opened);
        prop_assert_eq!(peak, 0);
        let mut datagram = Vec::new();
        sealer.seal(now, &payload, &mut datagram);
        let mut other = Sealer::new("secret", "another");
        prop_assert!(other.open(now, &datagram).is_err());
        let mut changed = datagram.clone();
        let at = flip.index(changed.len());
        changed[at] ^= 1 << bit;
        prop_assert!(sealer.open(now, &changed).is_err());
        prop_assert_eq!(sealer.open(now, &datagram).ok(), Some(&payload[..]));
        prop_assert!(sealer.open(now, &datagram).is_err(), "replay");
    }
}

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

const CLUSTER_TOML: &str = include_str!("../cluster.toml");

/// Peak bound of `Config::parse`: a TOML tree is several times its text. Measured: at most
/// `12 × len + 28 KiB` on mutated samples and extreme values.
fn config_bound(len: usize) -> usize {
    64 * len + 256 * KIB
}

/// Parses `text`, validates what parses, and returns the parse's peak allocation.
fn check_config(text: &str) -> usize {
    let (parsed, peak) = peak_during(|| Config::parse(text));
    assert!(
        peak <= config_bound(text.len()),
        "Config::parse allocated {peak} for {} bytes",
        text.len()
    );
    if let Ok(cfg) = parsed {
        let _ = cfg.validate();
    }
    peak
}

/// Edits of a TOML text.
#[derive(Debug, Clone)]
enum Edit {
    Flip(prop::sample::Index, u8),
    Insert(prop::sample::Index, u8),
    Delete(prop::sample::Index),
    Snippet(prop::sample::Index, &'static str),
    Truncate(prop::sample::Index),
}

/// TOML fragments that stress the parser and the value ranges.
const SNIPPETS: &[&str] = &[
    " = 18446744073709551615",
    " = 18446744073709551616",
    " = 9223372036854775807",
    " = 9223372036854775808",
    " = -9223372036854775808",
    " = -1",
    " = 0",
    " = nan",
    " = inf",
    " = -inf",
    " = 1e400",
    " = 0x7fffffffffffffff",
    " = 1979-05-27T07:32:00Z",
    " = { a = 1 }",
    " = [[[[[[[[[[1]]]]]]]]]]",
    "\n[limits]\nmax_body_bytes = 9223372036854775807\n",
    "\n[[nodes]]\n",
    "\n[[auth.users]]\nuid = \"a\"\npassword_hash = \"$argon2id$v=19$m=19456,t=2,p=1$AAAA$AAAA\"\n",
    "\n[delivery]\n",
    "\"\\u0000\"",
    "\"\\uD800\"",
    "'''",
    "\"\"\"",
    "\u{feff}",
    "\r",
    "#",
    "[",
    "]",
    "=",
    ".",
    "\"",
];

fn edit() -> BoxedStrategy<Edit> {
    let at = any::<prop::sample::Index>;
    prop_oneof![
        3 => (at(), 0u8..8).prop_map(|(i, b)| Edit::Flip(i, b)),
        2 => (at(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        2 => at().prop_map(Edit::Delete),
        3 => (at(), prop::sample::select(SNIPPETS)).prop_map(|(i, s)| Edit::Snippet(i, s)),
        1 => at().prop_map(Edit::Truncate),
    ]
    .boxed()
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for e in edits {
        let n = bytes.len();
        match e {
            Edit::Flip(i, bit) if n > 0 => bytes[i.index(n)] ^= 1 << bit,
            Edit::Insert(i, b) => bytes.insert(i.index(n + 1), *b),
            Edit::Delete(i) if n > 0 => {
                bytes.remove(i.index(n));
            }
            Edit::Snippet(i, s) => {
                let at = i.index(n + 1);
                bytes.splice(at..at, s.bytes());
            }
            Edit::Truncate(i) => bytes.truncate(i.index(n + 1)),
            Edit::Flip(..) | Edit::Delete(_) => {}
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A complete configuration as TOML, every key present: `Config`'s own serialization of its
/// defaults with three nodes, so new keys are covered without listing them here.
fn full_toml() -> String {
    let mut cfg = Config::for_test_nodes(3);
    for (i, n) in cfg.nodes.iter_mut().enumerate() {
        let port = 9500 + 3 * i as u16;
        n.http = format!("127.0.0.1:{port}").parse().expect("address");
        n.gossip = format!("127.0.0.1:{}", port + 1).parse().expect("address");
        n.quic = format!("127.0.0.1:{}", port + 2).parse().expect("address");
        n.advertise = Some(format!("localhost:{port}"));
    }
    toml::to_string(&cfg).expect("a config serializes")
}

/// Literals for a numeric value: extremes of every integer type, and not numbers at all.
fn number_literal() -> BoxedStrategy<String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "0", "1", "-1", "4294967295", "4294967296", "9223372036854775807",
            "-9223372036854775808", "18446744073709551615", "18446744073709551616",
            "604800000", "604800001", "604800", "86400000", "nan", "inf", "-inf", "1e308",
            "-0.0", "0.5", "1_000", "0xff", "\"100\"", "true", "[]", "{}",
        ])
        .prop_map(String::from),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<u64>().prop_map(|n| n.to_string()),
        1 => (0i64..1 << 40).prop_map(|n| n.to_string()),
    ]
    .boxed()
}

/// `full_toml()` with some numeric values replaced by extreme literals.
fn extreme_config() -> BoxedStrategy<String> {
    let base = full_toml();
    prop::collection::vec((any::<prop::sample::Index>(), number_literal()), 1..10)
        .prop_map(move |swaps| {
            let mut lines: Vec<String> = base.lines().map(String::from).collect();
            let numeric: Vec<usize> = lines
                .iter()
                .enumerate()
                .filter(|(_, l)| {
                    l.split_once(" = ")
                        .is_some_and(|(_, v)| v.parse::<f64>().is_ok() || v.parse::<i64>().is_ok())
                })
                .map(|(i, _)| i)
                .collect();
            for (at, literal) in swaps {
                let line = numeric[at.index(numeric.len())];
                let key = lines[line]
                    .split_once(" = ")
                    .expect("numeric line")
                    .0
                    .to_string();
                lines[line] = format!("{key} = {literal}");
            }
            lines.join("\n")
        })
        .boxed()
}

#[test]
fn config_samples_are_valid() {
    let cfg = Config::parse(CLUSTER_TOML).expect("cluster.toml parses");
    cfg.validate().expect("cluster.toml validates");
    let full = full_toml();
    let cfg = Config::parse(&full).expect("full_toml parses");
    cfg.validate().expect("full_toml validates");
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn config_from_arbitrary_text(text in prop_oneof![
        any::<String>(),
        "[\\[\\]a-z_=\"'.,{} \\n0-9#-]{0,300}",
    ]) {
        check_config(&text);
    }

    #[test]
    fn config_from_mutated_cluster_toml(edits in prop::collection::vec(edit(), 1..8)) {
        check_config(&apply(CLUSTER_TOML, &edits));
    }

    #[test]
    fn config_with_extreme_numbers(text in extreme_config()) {
        check_config(&text);
    }
}

/// `Config` values as they can come out of any serde format (or be built in code): every
/// number of the defaults replaced by an extreme up to `max`. A `Config` is plain public
/// data, so `validate` must hold for all of them.
fn json_config(max: u64) -> BoxedStrategy<serde_json::Value> {
    let base = serde_json::to_value(Config::for_test_nodes(2)).expect("a config serializes");
    let extreme = prop_oneof![
        3 => prop::sample::select(vec![0, 1, max, max - 1, max / 2, max / 2 + 1, u64::from(u32::MAX), u64::from(u32::MAX) + 1]),
        1 => 0..=max,
    ];
    prop::collection::vec((any::<prop::sample::Index>(), extreme), 1..12)
        .prop_map(move |swaps| {
            let mut value = base.clone();
            let mut numbers = Vec::new();
            collect_number_paths(&value, &mut String::new(), &mut numbers);
            for (at, n) in swaps {
                let path = &numbers[at.index(numbers.len())];
                *value.pointer_mut(path).expect("path exists") = serde_json::Value::from(n);
            }
            value
        })
        .boxed()
}

fn collect_number_paths(v: &serde_json::Value, path: &mut String, out: &mut Vec<String>) {
    let len = path.len();
    match v {
        serde_json::Value::Number(n) if n.is_u64() => out.push(path.clone()),
        serde_json::Value::Object(map) => {
            for (k, child) in map {
                let _ = write!(path, "/{k}");
                collect_number_paths(child, path, out);
                path.truncate(len);
            }
        }
        serde_json::Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                let _ = write!(path, "/{i}");
                collect_number_paths(child, path, out);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

fn validate_json_config(value: serde_json::Value) {
    // Numbers too large for their field (u64::MAX into a u32) are refused by serde.
    if let Ok(cfg) = serde_json::from_value::<Config>(value) {
        let _ = cfg.validate();
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// Up to `i64::MAX`.
    #[test]
    fn config_validate_with_numbers_up_to_i64_max(value in json_config(i64::MAX as u64)) {
        validate_json_config(value);
    }

    /// Up to `u64::MAX` (the `toml` crate reads those too, and so do other serde formats).
    #[test]
    fn config_validate_with_numbers_up_to_u64_max(value in json_config(u64::MAX)) {
        validate_json_config(value);
    }
}

/// Regression: `Config::validate` checked `l.outbound_queue < l.max_inflight_per_session +
/// self.delivery.max_held_per_user` with an unchecked `usize` addition (commit 2aa8fb1 and
/// before). The `toml` crate reads integers up to `u64::MAX` into a `usize` field, so
/// `cluster.toml` with `max_held_per_user = 18446744073709551615` in `[delivery]` parsed,
/// and `validate` panicked with "attempt to add with overflow" in a debug build (in release
/// the sum wrapped to 1023 and the config was accepted). Found by
/// `config_validate_with_numbers_up_to_u64_max`; fixed with a `saturating_add`.
#[test]
fn config_validate_huge_queue_sum_is_refused_without_overflow() {
    for (anchor, key) in [
        ("hold_ms = 5000\n", "max_held_per_user"),
        ("[api]\n", "max_inflight_per_session"),
    ] {
        let text = if key == "max_held_per_user" {
            CLUSTER_TOML.replace(anchor, &format!("{anchor}{key} = 18446744073709551615\n"))
        } else {
            CLUSTER_TOML.replace(
                anchor,
                &format!("[limits]\n{key} = 18446744073709551615\n\n{anchor}"),
            )
        };
        let cfg = Config::parse(&text).expect("toml reads u64 values");
        assert_eq!(
            cfg.delivery
                .max_held_per_user
                .max(cfg.limits.max_inflight_per_session),
            usize::MAX
        );
        let result = std::panic::catch_unwind(|| cfg.validate().is_ok());
        assert!(
            matches!(result, Ok(false)),
            "{key}: validate must refuse it without panicking: {result:?}"
        );
    }
}

#[test]
fn config_measured_peaks() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut worst = Worst::default();
    let edits = prop::collection::vec(edit(), 1..8);
    for _ in 0..300 {
        let text = apply(
            CLUSTER_TOML,
            &edits.new_tree(&mut runner).expect("tree").current(),
        );
        worst.note(text.len(), check_config(&text), 12);
    }
    let extreme = extreme_config();
    for _ in 0..100 {
        let text = extreme.new_tree(&mut runner).expect("tree").current();
        worst.note(text.len(), check_config(&text), 12);
    }
    eprintln!("config: {worst:?} (bound 64 × len + 256 KiB; over_slope is peak - 12 × len)");
}

// ---------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------

const SECRET: &str = "the-right-secret";
const ISSUER: &str = "imgate";
const AUDIENCE: &str = "imgate-local";
const TTL_S: u64 = 7200;
const LEEWAY_S: u64 = 30;

fn keys() -> TokenKeys {
    TokenKeys::new(SECRET, ISSUER, AUDIENCE, TTL_S, LEEWAY_S)
}

/// Peak bound of one `verify`: base64 decoding and JSON of at most the token's length, a
/// few copies. Measured: at most `2 × len`.
fn token_bound(len: usize) -> usize {
    8 * len + 64 * KIB
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn hs256(secret: &str, message: &str) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(message.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// A JSON header: `alg` HS256 most of the time, else another algorithm, a wrong type or
/// missing; sometimes extra or nested fields.
fn jwt_header() -> BoxedStrategy<String> {
    let alg = prop_oneof![
        12 => Just("\"HS256\"".to_string()),
        2 => prop::sample::select(vec!["\"none\"", "\"HS384\"", "\"HS512\"", "\"RS256\"", "\"ES256\"", "\"EdDSA\"", "\"hs256\"", "\"\""])
            .prop_map(String::from),
        1 => json_value(),
    ];
    let typ = prop_oneof![4 => Just("\"JWT\"".to_string()), 1 => json_value()];
    (
        prop::option::weighted(0.95, alg),
        prop::option::of(typ),
        prop::option::weighted(0.2, json_value()),
    )
        .prop_map(|(alg, typ, extra)| {
            let mut fields = Vec::new();
            if let Some(alg) = alg {
                fields.push(format!("\"alg\":{alg}"));
            }
            if let Some(typ) = typ {
                fields.push(format!("\"typ\":{typ}"));
            }
            if let Some(extra) = extra {
                fields.push(format!("\"kid\":{extra}"));
            }
            format!("{{{}}}", fields.join(","))
        })
        .boxed()
}

/// A claim that is a time: near now (valid or just outside the leeway), or extreme, or of
/// the wrong type.
fn time_claim(now: u64) -> BoxedStrategy<String> {
    prop_oneof![
        4 => (-20_000i64..20_000).prop_map(move |d| now.saturating_add_signed(d).to_string()),
        2 => prop::sample::select(vec![
            "0", "-1", "-9223372036854775808", "18446744073709551615", "18446744073709551616",
            "1e400", "1.5e9", "-0", "null", "\"1700000000\"", "[1700000000]", "{\"t\":1}",
        ])
        .prop_map(String::from),
        1 => any::<u64>().prop_map(|n| n.to_string()),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => json_value(),
    ]
    .boxed()
}

/// A string claim: the right value, a near miss, or any JSON.
fn string_claim(right: &'static str) -> BoxedStrategy<String> {
    prop_oneof![
        16 => Just(format!("\"{right}\"")),
        1 => Just(format!("[\"{right}\"]")),
        1 => Just(format!("\"{right} \"")),
        1 => json_value(),
    ]
    .boxed()
}

/// `iat`, `nbf` and `exp`: either consistent with each other around now (so that some
/// tokens are valid and others miss by a little), or each on its own, extreme or absent.
fn time_claims(now: u64) -> BoxedStrategy<[Option<String>; 3]> {
    prop_oneof![
        2 => (-4_000i64..60, -90i64..90, -60i64..7_400).prop_map(move |(iat, nbf, life)| {
            let iat = now.saturating_add_signed(iat);
            [
                Some(iat.to_string()),
                Some(iat.saturating_add_signed(nbf).to_string()),
                Some(iat.saturating_add_signed(life).to_string()),
            ]
        }),
        1 => [
            prop::option::weighted(0.9, time_claim(now)),
            prop::option::weighted(0.9, time_claim(now)),
            prop::option::weighted(0.9, time_claim(now)),
        ],
    ]
    .boxed()
}

/// JWT claims as JSON: each claim present or not, right or wrong, sometimes twice.
fn jwt_claims(now: u64) -> BoxedStrategy<String> {
    let sub = prop_oneof![
        6 => "[a-z]{1,12}".prop_map(|s| format!("\"{s}\"")),
        1 => Just("\"$system\"".to_string()),
        1 => Just(format!("\"{}\"", "a".repeat(129))),
        1 => json_string(),
        1 => json_value(),
    ];
    let jti = prop_oneof![3 => Just("\"0123abcd\"".to_string()), 1 => json_leaf()];
    let claims = (
        prop::option::weighted(0.95, sub),
        time_claims(now),
        prop::option::weighted(0.95, string_claim(ISSUER)),
        prop::option::weighted(0.95, string_claim(AUDIENCE)),
        prop::option::weighted(0.95, jti),
        prop::collection::vec((json_key(), json_value()), 0..2),
    );
    claims
        .prop_map(|(sub, [iat, nbf, exp], iss, aud, jti, extra)| {
            let mut fields = Vec::new();
            for (k, v) in [
                ("sub", sub),
                ("iat", iat),
                ("nbf", nbf),
                ("exp", exp),
                ("iss", iss),
                ("aud", aud),
                ("jti", jti),
            ] {
                if let Some(v) = v {
                    fields.push(format!("\"{k}\":{v}"));
                }
            }
            fields.push("\"node\":\"n1\"".into());
            fields.push("\"url\":\"ws://127.0.0.1:9501/ws\"".into());
            for (k, v) in extra {
                fields.push(format!("{k}:{v}"));
            }
            format!("{{{}}}", fields.join(","))
        })
        .boxed()
}

/// Checks one token against the keys: never a panic, the allocation bound, and `Ok` only
/// for a well-formed token signed with the right secret whose claims hold.
fn check_token(token: &str, signed_right: bool) -> Result<(), TestCaseError> {
    let before = unix_now();
    let (verified, peak) = peak_during(|| keys().verify(token));
    let after = unix_now();
    prop_assert!(
        peak <= token_bound(token.len()),
        "verify allocated {peak} bytes for {}",
        token.len()
    );
    let Ok(claims) = verified else {
        return Ok(());
    };
    prop_assert!(
        signed_right,
        "accepted a token not signed with the secret: {token}"
    );
    // The header must have named HS256.
    let header = token.split('.').next().expect("three parts");
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .expect("accepted header is base64url");
    let header: serde_json::Value =
        serde_json::from_slice(&header).expect("accepted header is JSON");
    prop_assert!(header["alg"] == "HS256", "accepted alg {}", header["alg"]);
    prop_assert!(
        validate_uid(&claims.sub).is_ok(),
        "bad sub accepted: {:?}",
        claims.sub
    );
    prop_assert_eq!(claims.iss.as_str(), ISSUER);
    prop_assert_eq!(claims.aud.as_str(), AUDIENCE);
    prop_assert!(
        claims.exp.saturating_add(LEEWAY_S) >= before,
        "expired token accepted"
    );
    prop_assert!(claims.nbf <= after + LEEWAY_S, "immature token accepted");
    prop_assert!(
        claims.iat <= after + LEEWAY_S,
        "token from the future accepted"
    );
    prop_assert!(
        claims.exp.saturating_sub(claims.iat) <= TTL_S + LEEWAY_S,
        "lifetime too long"
    );
    Ok(())
}

fn forged_token(signer: BoxedStrategy<Option<&'static str>>) -> BoxedStrategy<(String, bool)> {
    let now = unix_now();
    (jwt_header(), jwt_claims(now), signer, 0u8..16)
        .prop_map(|(header, claims, signer, variant)| {
            let message = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
            let signature = match signer {
                Some(secret) => b64(&hs256(secret, &message)),
                None => b64(&[variant; 32]),
            };
            let token = match variant {
                // Standard base64 with padding instead of base64url.
                0 => {
                    let std = base64::engine::general_purpose::STANDARD;
                    format!(
                        "{}.{}.{signature}",
                        std.encode(&header),
                        std.encode(&claims)
                    )
                }
                // Four segments, or two.
                1 => format!("{message}.{signature}.{signature}"),
                2 => message.clone(),
                _ => format!("{message}.{signature}"),
            };
            (token, signer == Some(SECRET))
        })
        .boxed()
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn tokens_from_arbitrary_text(token in prop_oneof![
        any::<String>(),
        "[A-Za-z0-9_=+/.-]{0,400}",
        "[A-Za-z0-9_-]{0,80}\\.[A-Za-z0-9_-]{0,80}\\.[A-Za-z0-9_-]{0,60}",
    ]) {
        check_token(&token, false)?;
    }

    #[test]
    fn tokens_with_forged_or_wrong_signatures((token, right) in forged_token(
        prop_oneof![Just(None), Just(Some("the-wrong-secret")), Just(Some("")), Just(Some("the-right-secre"))].boxed()
    )) {
        prop_assert!(!right);
        check_token(&token, false)?;
    }

    #[test]
    fn tokens_signed_with_the_secret((token, right) in forged_token(Just(Some(SECRET)).boxed())) {
        check_token(&token, right)?;
    }

    #[test]
    fn issued_tokens_verify(uid in "[a-zA-Z0-9_é李 ]{1,40}", skew in -25i64..25) {
        prop_assume!(validate_uid(&uid).is_ok());
        let keys = keys();
        let now = unix_now().saturating_add_signed(skew);
        let (token, claims) = keys.issue(&uid, "n1", "ws://127.0.0.1:9501/ws", now);
        prop_assert_eq!(keys.verify(&token), Ok(claims));
        let other = TokenKeys::new("the-wrong-secret", ISSUER, AUDIENCE, TTL_S, LEEWAY_S);
        prop_assert!(matches!(other.verify(&token), Err(TokenError::Invalid(_))));
        let other_cluster = TokenKeys::new(SECRET, ISSUER, "another-cluster", TTL_S, LEEWAY_S);
        prop_assert!(other_cluster.verify(&token).is_err());
    }
}

/// Was a latent bug (API level; src/auth.rs): `TokenKeys` trusted its `ttl_s` and `leeway_s`.
/// `issue` computed `now + self.ttl_s` unchecked (panicked in debug with
/// `ttl_s = u64::MAX`, wraps in release to an `exp` in the past), and `verify` hands
/// `leeway_s` to jsonwebtoken 11.1, whose `now - options.leeway` (validation.rs:284) panics in
/// debug for any correctly signed token once `leeway_s` exceeds the current unix time (and
/// wraps in release, refusing every token as expired). Not reachable from a configuration:
/// `Config::validate` (called by `node::start`) caps both at 7 days, and an outsider cannot
/// sign a token; only code calling `TokenKeys::new` directly with unchecked values could.
/// Fixed: `new` clamps both to a year and `issue` adds with saturation.
#[test]
fn token_keys_with_huge_ttl_or_leeway_do_not_panic() {
    let keys = TokenKeys::new(SECRET, ISSUER, AUDIENCE, u64::MAX, LEEWAY_S);
    let issue = std::panic::catch_unwind(|| keys.issue("alice", "n1", "ws://h/ws", unix_now()));
    let keys = TokenKeys::new(SECRET, ISSUER, AUDIENCE, TTL_S, u64::MAX / 2);
    let (token, _) = keys.issue("alice", "n1", "ws://h/ws", unix_now());
    let verify = std::panic::catch_unwind(|| keys.verify(&token).is_ok());
    assert!(
        issue.is_ok() && verify.is_ok(),
        "issue with ttl_s = u64::MAX panicked: {}; verify with leeway_s = u64::MAX / 2 \
         panicked: {}",
        issue.is_err(),
        verify.is_err()
    );
}

/// The signed-with-the-secret generator does reach accepted tokens.
#[test]
fn token_generator_reaches_accepted_tokens() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = forged_token(Just(Some(SECRET)).boxed());
    let keys = keys();
    let accepted = (0..400)
        .filter(|_| {
            keys.verify(&strategy.new_tree(&mut runner).expect("tree").current().0)
                .is_ok()
        })
        .count();
    assert!(accepted >= 20, "only {accepted} accepted tokens in 400");
}

#[test]
fn token_measured_peaks() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut worst = Worst::default();
    let keys = keys();
    for signer in [None, Some(SECRET)] {
        let strategy = forged_token(Just(signer).boxed());
        for _ in 0..200 {
            let (token, _) = strategy.new_tree(&mut runner).expect("tree").current();
            let (_, peak) = peak_during(|| keys.verify(&token));
            worst.note(token.len(), peak, 2);
        }
    }
    eprintln!("tokens: {worst:?} (bound 8 × len + 64 KiB; over_slope is peak - 2 × len)");
}
