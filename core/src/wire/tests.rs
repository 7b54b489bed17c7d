//! Unit tests of the codec: limits, refusals, sizes.

use super::*;

fn sample() -> Slots {
    Slots {
        slot: 2,
        round: 7,
        sent_at: 1_700_000_000_000_000_000,
        last: false,
        groups: vec![LimitGroup {
            limit: 0x0102_0304_0506_0708,
            newest: 28_333_333,
            keys: vec![KeySlots {
                key: 0xdead_beef_0000_0001,
                buckets: vec![
                    BucketSlot {
                        back: 0,
                        p: 300,
                        n: 0,
                    },
                    BucketSlot {
                        back: 1,
                        p: 2,
                        n: 1,
                    },
                ],
            }],
        }],
    }
}

#[test]
fn every_frame_round_trips() {
    let frames = vec![
        Frame::Hello(Hello {
            slot: 1,
            name: "node-1".into(),
            incarnation: 3,
            rules_digest: 9,
            recovering: true,
        }),
        Frame::Delta(sample()),
        Frame::Sync(sample()),
        Frame::Recovery(sample()),
        Frame::Ack(Ack {
            slot: 0,
            rounds: vec![5, 6, 7],
            echo_sent_at: 10,
            received_at: 20,
            replied_at: 25,
        }),
        Frame::Swim(Swim {
            payload: vec![1, 2, 3],
        }),
    ];
    for f in frames {
        assert_eq!(Frame::decode(&f.encode()), Ok(f.clone()), "{f:?}");
    }
}

#[test]
fn refuses_what_it_does_not_understand() {
    let good = Frame::Delta(sample()).encode();
    assert_eq!(Frame::decode(&[]), Err(DecodeError::Empty));
    assert_eq!(Frame::decode(&[VERSION]), Err(DecodeError::Empty));
    let mut v2 = good.clone();
    v2[0] = 2;
    assert_eq!(Frame::decode(&v2), Err(DecodeError::UnknownVersion(2)));
    let mut k = good.clone();
    k[1] = 99;
    assert_eq!(Frame::decode(&k), Err(DecodeError::UnknownKind(99)));
    for cut in 2..good.len() {
        assert!(Frame::decode(&good[..cut]).is_err(), "truncated at {cut}");
    }
    let mut extra = good.clone();
    extra.push(0);
    assert_eq!(Frame::decode(&extra), Err(DecodeError::Trailing(1)));
    assert!(matches!(
        Frame::decode(&vec![VERSION; MAX_FRAME_BYTES + 1]),
        Err(DecodeError::TooLarge(_))
    ));
}

#[test]
fn refuses_values_outside_any_window() {
    let mut s = sample();
    s.groups[0].keys[0].buckets[0].back = 64;
    assert!(matches!(
        Frame::decode(&Frame::Delta(s).encode()),
        Err(DecodeError::Invalid(_))
    ));
    let mut s = sample();
    s.groups[0].keys[0].key = 0;
    assert!(matches!(
        Frame::decode(&Frame::Delta(s).encode()),
        Err(DecodeError::Invalid(_))
    ));
    let mut s = sample();
    s.groups[0].keys[0].buckets.clear();
    assert!(matches!(
        Frame::decode(&Frame::Delta(s).encode()),
        Err(DecodeError::Invalid(_))
    ));
}

#[test]
fn a_huge_declared_length_is_refused_without_allocating_it() {
    // Delta with a group count of 2^63 and nothing behind it.
    let mut bytes = vec![VERSION, Kind::Delta as u8, 2, 7, 0, 0];
    bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
    assert!(matches!(
        Frame::decode(&bytes),
        Err(DecodeError::Malformed { .. })
    ));
}

#[test]
fn varint_lengths() {
    assert_eq!(varint_len(0), 1);
    assert_eq!(varint_len(127), 1);
    assert_eq!(varint_len(128), 2);
    assert_eq!(varint_len(u64::from(u32::MAX)), 5);
    assert_eq!(varint_len(u64::MAX), 10);
}

#[test]
fn packed_frames_fit_the_budget_and_carry_everything() {
    let mut p = SlotsPacker::new(1200, 3, 100, 1_700_000_000_000_000_000);
    let mut sent = 0;
    for limit in 0..3u64 {
        for key in 1..=500u64 {
            let buckets = vec![
                BucketSlot {
                    back: 0,
                    p: (key * 37) as u32,
                    n: 0,
                },
                BucketSlot {
                    back: 1,
                    p: 1,
                    n: 0,
                },
            ];
            p.push(limit + 1, 1000, KeySlots { key, buckets });
            sent += 2;
        }
    }
    let frames = p.finish();
    assert!(frames.len() > 1);
    assert!(frames.last().unwrap().last);
    let mut got = 0;
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(f.round, 100 + i as u64);
        let bytes = Frame::Delta(f.clone()).encode();
        assert!(bytes.len() <= 1200, "frame {i} is {} bytes", bytes.len());
        got += f.values();
    }
    assert_eq!(got, sent);
}
