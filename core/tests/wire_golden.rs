//! Golden byte vectors of the wire protocol (proto-spec/vectors/).
//!
//! Each vector is a frame written down once, byte for byte. The test decodes
//! it and compares every field with the frame below, then encodes the frame
//! and compares the bytes. A change that breaks either side changes the
//! protocol: bump `wire::VERSION` and write new vectors on purpose
//! (`DRL_WRITE_GOLDEN=1 cargo test --test wire_golden` rewrites them).

use std::path::PathBuf;

use drl_core::wire::{
    Ack, BucketSlot, DecodeError, Forget, Frame, Hearing, Hello, KeySlots, Leave, LimitGroup,
    RecoveryDone, RefundAnswer, RefundAsk, RefundReply, RefundedLimit, RelayedAnswer, ResetAck,
    ResetFrame, ResetKey, RulesAck, RulesFrame, RulesId, Slots, Swim, VERSION,
};

fn vectors() -> Vec<(&'static str, Frame)> {
    let slots = |slot: u16, round: u64, last: bool| Slots {
        slot,
        round,
        sent_at: 1_700_000_000_123_456_789,
        last,
        groups: vec![
            LimitGroup {
                limit: 0x0123_4567_89ab_cdef,
                newest: 1_700_000_000,
                keys: vec![
                    KeySlots {
                        key: 0xfeed_face_cafe_beef,
                        buckets: vec![
                            BucketSlot {
                                back: 0,
                                p: 300,
                                n: 0,
                            },
                            BucketSlot {
                                back: 1,
                                p: 17,
                                n: 2,
                            },
                        ],
                    },
                    KeySlots {
                        key: 1,
                        buckets: vec![BucketSlot {
                            back: 0,
                            p: 1,
                            n: 0,
                        }],
                    },
                ],
            },
            LimitGroup {
                limit: 42,
                newest: 0,
                keys: vec![],
            },
        ],
    };
    vec![
        (
            "hello",
            Frame::Hello(Hello {
                slot: 2,
                name: "node-2".into(),
                incarnation: 1_700_000_000_123,
                rules_digest: 0xdead_beef_0bad_f00d,
                recovering: true,
            }),
        ),
        ("delta", Frame::Delta(slots(1, 4_294_967_296, false))),
        ("sync", Frame::Sync(slots(0, 7, true))),
        ("recovery", Frame::Recovery(slots(2, 9, true))),
        ("claim", Frame::Claim(slots(1, 4_294_967_301, true))),
        ("answer", Frame::Answer(slots(2, 4_294_967_301, true))),
        (
            "relayed-answer",
            Frame::RelayedAnswer(RelayedAnswer {
                answer: slots(2, 4_294_967_301, true),
                others: vec![
                    slots(0, 4_294_967_301, true),
                    slots(300, 4_294_967_301, true),
                ],
            }),
        ),
        (
            "ack",
            Frame::Ack(Ack {
                slot: 1,
                rounds: vec![4_294_967_296, 4_294_967_297],
                echo_sent_at: 1_700_000_000_123_456_789,
                received_at: 1_700_000_000_124_000_000,
                replied_at: 1_700_000_000_124_000_100,
            }),
        ),
        (
            "swim",
            Frame::Swim(Swim {
                payload: vec![0, 1, 2, 254, 255],
            }),
        ),
        (
            "rules",
            Frame::Rules(RulesFrame {
                version: 3,
                origin: 1,
                text: "[[rules]]\nname = \"x\"\n".into(),
            }),
        ),
        (
            "reset",
            Frame::Reset(ResetFrame {
                origin: 1,
                seq: 111_411_200_000_000_001,
                keys: vec![
                    ResetKey {
                        limit: 0x0123_4567_89ab_cdef,
                        key: 0xfeed_face_cafe_beef,
                    },
                    ResetKey { limit: 42, key: 1 },
                ],
            }),
        ),
        (
            "reset_ack",
            Frame::ResetAck(ResetAck {
                slot: 2,
                origin: 1,
                seq: 111_411_200_000_000_001,
            }),
        ),
        (
            "refund_ask",
            Frame::RefundAsk(RefundAsk {
                slot: 1,
                id: 7,
                receipt: "01000200".into(),
            }),
        ),
        (
            "refund_reply",
            Frame::RefundReply(RefundReply {
                slot: 2,
                id: 7,
                outcome: RefundAnswer::Refunded {
                    requested: 3,
                    limits: vec![RefundedLimit {
                        limit: 0x0123_4567_89ab_cdef,
                        refunded: 3,
                    }],
                },
            }),
        ),
        (
            "refund_refused",
            Frame::RefundReply(RefundReply {
                slot: 2,
                id: 8,
                outcome: RefundAnswer::Refused(4),
            }),
        ),
        (
            "leave",
            Frame::Leave(Leave {
                slot: 3,
                incarnation: 1_733_300_000_000,
            }),
        ),
        (
            "hearing",
            Frame::Hearing(Hearing {
                slot: 1,
                silent: vec![2, 300],
            }),
        ),
        (
            "forget",
            Frame::Forget(Forget {
                slot: 0,
                member: 300,
            }),
        ),
        (
            "recovery-done",
            Frame::RecoveryDone(RecoveryDone {
                slot: 2,
                first: 4_294_967_296,
                last: 4_294_967_300,
                vouched: vec![1, 300],
            }),
        ),
        (
            "rules-ack",
            Frame::RulesAck(RulesAck {
                offered: RulesId {
                    counter: 3,
                    origin: 1,
                    digest: 0x0123_4567_89ab_cdef,
                },
                current: RulesId {
                    counter: 300,
                    origin: 2,
                    digest: 0xfedc_ba98_7654_3210,
                },
            }),
        ),
    ]
}

fn path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../proto-spec/vectors/{name}.hex"))
}

fn to_hex(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (i, chunk) in bytes.chunks(16).enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let line: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
        out.push_str(&line.join(" "));
    }
    out.push('\n');
    out
}

fn from_hex(text: &str) -> Vec<u8> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .flat_map(|l| l.split_whitespace())
        .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
        .collect()
}

#[test]
fn golden_vectors_decode_field_by_field_and_encode_byte_for_byte() {
    let write = std::env::var_os("DRL_WRITE_GOLDEN").is_some();
    for (name, frame) in vectors() {
        let encoded = frame.encode();
        if write {
            let text = format!(
                "# {name} frame, protocol version {VERSION}\n{}",
                to_hex(&encoded)
            );
            std::fs::write(path(name), text).unwrap();
        }
        let text = std::fs::read_to_string(path(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let golden = from_hex(&text);
        assert_eq!(golden[0], VERSION, "{name}: version byte");
        assert_eq!(
            Frame::decode(&golden).as_ref(),
            Ok(&frame),
            "{name}: decode"
        );
        assert_eq!(encoded, golden, "{name}: encode changed the bytes");
    }
}

#[test]
fn the_delta_vector_has_the_layout_the_spec_describes() {
    let golden = from_hex(&std::fs::read_to_string(path("delta")).unwrap());
    // version, kind (Delta = 2), slot 1 as a varint
    assert_eq!(&golden[..3], &[1, 2, 1]);
    // round 2^32 as a LEB128 varint: five bytes
    assert_eq!(&golden[3..8], &[0x80, 0x80, 0x80, 0x80, 0x10]);
    // the limit id is 8 bytes little-endian, not a varint
    let at = golden
        .windows(8)
        .position(|w| w == 0x0123_4567_89ab_cdef_u64.to_le_bytes())
        .expect("fixint limit id");
    assert!(at > 8);
}

#[test]
fn the_rules_ack_vector_has_the_layout_the_spec_describes() {
    let golden = from_hex(&std::fs::read_to_string(path("rules-ack")).unwrap());
    // version, kind (RulesAck = 10), offered: counter 3, origin 1, digest
    // as 8 bytes little-endian; current: counter 300 as a two-byte varint,
    // origin 2, digest.
    let mut expected = vec![1, 10, 3, 1];
    expected.extend_from_slice(&0x0123_4567_89ab_cdef_u64.to_le_bytes());
    expected.extend_from_slice(&[0xac, 0x02, 2]);
    expected.extend_from_slice(&0xfedc_ba98_7654_3210_u64.to_le_bytes());
    assert_eq!(golden, expected);
    // Cut anywhere, or followed by anything, it is refused whole.
    for cut in 2..golden.len() {
        assert!(Frame::decode(&golden[..cut]).is_err(), "cut at {cut}");
    }
    let mut longer = golden.clone();
    longer.push(0);
    assert_eq!(Frame::decode(&longer), Err(DecodeError::Trailing(1)));
    // A kind this version does not know is refused, not guessed at.
    let mut unknown = golden;
    unknown[1] = 11;
    assert_eq!(Frame::decode(&unknown), Err(DecodeError::UnknownKind(11)));
}

#[test]
fn a_relayed_answer_never_relays_its_senders_own_slot() {
    let golden = from_hex(&std::fs::read_to_string(path("relayed-answer")).unwrap());
    // version, kind (RelayedAnswer = 20), then the sender's own slot 2.
    assert_eq!(&golden[..3], &[1, 20, 2]);
    let Ok(Frame::RelayedAnswer(mut relayed)) = Frame::decode(&golden) else {
        panic!("the vector decodes as a RelayedAnswer");
    };
    relayed.others[1].slot = relayed.answer.slot;
    let bytes = Frame::RelayedAnswer(relayed).encode();
    assert_eq!(
        Frame::decode(&bytes),
        Err(DecodeError::Invalid(
            "a relay carries the sender's own slot"
        ))
    );
}
