//! The sparse cell list of one key: only the non-zero slot values of its
//! window, in 32-bit words.
//!
//! A key's window is `buckets × slots` slot values, but most of them are
//! zero: a key is touched by few nodes, and by each in few buckets. The
//! entry therefore keeps a packed list of *cells*, one per non-zero
//! component (`p` or `n`) of one slot in one bucket row. Slots below 64
//! take the compact form:
//!
//! ```text
//! header word  bits 0..6   row (bucket epoch mod buckets; < MAX_BUCKETS)
//!              bits 6..12  node slot (< 64)
//!              bits 12..14 kind: 0 = p, 1 = n, 2 = restored record
//!              bit  14     wide: the value is the next word
//!              bits 15..32 the value when narrow (at most NARROW_MAX)
//! ```
//!
//! A narrow cell is one word; a value above `NARROW_MAX` (131,071) escapes to
//! a wide cell of two words. Any slot from 64 up to `u16::MAX` escapes to an
//! *extended* cell of two words, whatever its value:
//!
//! ```text
//! header word  bits 0..6   row
//!              bits 6..12  zero
//!              bits 12..14 kind 3: extended
//!              bit  14     wide (always set: the value is the next word)
//!              bits 15..31 node slot (16 bits)
//!              bit  31     component: 0 = p, 1 = n
//! value word   the value
//! ```
//!
//! So a cluster of up to 64 nodes stores exactly what it did when 64 was the
//! ceiling, and a larger one pays a word more per non-zero value of its
//! slots from 64 on. A restored record (what the eviction sketch gave this
//! key back, see the table) is a header and two words. Cells sit at the
//! front of the cell area; the first zero word ends them (a stored cell is
//! never zero: narrow cells hold non-zero values, wide, extended and
//! restored ones have flag bits set).
//!
//! Every function here runs under the entry's lock; the atomics are only
//! the arena's storage type (loads and stores are relaxed).

use std::sync::atomic::{AtomicU32, Ordering};

use crate::slot::PnSlot;

const ROW_BITS: u32 = 6;
const SLOT_SHIFT: u32 = 6;
const SLOT_BITS: u32 = 6;
/// Slots below this take compact cells; the others extended ones.
const COMPACT_SLOTS: usize = 1 << SLOT_BITS;
const KIND_SHIFT: u32 = 12;
const WIDE: u32 = 1 << 14;
const VALUE_SHIFT: u32 = 15;
/// Where an extended cell keeps its slot (16 bits) and its component.
const EXT_SLOT_SHIFT: u32 = 15;
const EXT_N: u32 = 1 << 31;
/// The largest value a one-word cell holds.
pub const NARROW_MAX: u32 = (1 << (32 - VALUE_SHIFT)) - 1;

const KIND_P: u32 = 0;
const KIND_N: u32 = 1;
const KIND_RESTORED: u32 = 2;
const KIND_EXTENDED: u32 = 3;

/// The most words the cells of one window can need: every slot of every
/// bucket with both components two words (wide or extended), plus a
/// restored record.
pub fn worst_words(buckets: usize, slots: usize) -> usize {
    buckets * slots * 2 * 2 + 3
}

fn load(w: &AtomicU32) -> u32 {
    w.load(Ordering::Relaxed)
}

fn store(w: &AtomicU32, v: u32) {
    w.store(v, Ordering::Relaxed)
}

fn row_of(h: u32) -> usize {
    (h & ((1 << ROW_BITS) - 1)) as usize
}
fn slot_of(h: u32) -> usize {
    if kind_of(h) == KIND_EXTENDED {
        ((h >> EXT_SLOT_SHIFT) & 0xffff) as usize
    } else {
        ((h >> SLOT_SHIFT) & ((1 << SLOT_BITS) - 1)) as usize
    }
}
fn kind_of(h: u32) -> u32 {
    (h >> KIND_SHIFT) & 3
}
/// The component a cell holds (`KIND_P` or `KIND_N`), `None` for the
/// restored record.
fn component_of(h: u32) -> Option<u32> {
    match kind_of(h) {
        KIND_RESTORED => None,
        KIND_EXTENDED if h & EXT_N != 0 => Some(KIND_N),
        KIND_EXTENDED => Some(KIND_P),
        k => Some(k),
    }
}
fn width(h: u32) -> usize {
    if kind_of(h) == KIND_RESTORED {
        3
    } else if h & WIDE != 0 {
        2
    } else {
        1
    }
}
/// What names the cell of `kind` for `slot` in `row`: a compact cell's
/// header bits below the wide flag and the value, or an extended cell's
/// whole header (which has no value bits). The two never collide: their
/// kind bits differ.
fn tag(row: usize, slot: usize, kind: u32) -> u32 {
    if slot < COMPACT_SLOTS || kind == KIND_RESTORED {
        (row as u32) | ((slot as u32) << SLOT_SHIFT) | (kind << KIND_SHIFT)
    } else {
        debug_assert!(slot <= usize::from(u16::MAX), "slot {slot}");
        let n = if kind == KIND_N { EXT_N } else { 0 };
        (row as u32)
            | (KIND_EXTENDED << KIND_SHIFT)
            | WIDE
            | (((slot as u32) & 0xffff) << EXT_SLOT_SHIFT)
            | n
    }
}
fn tag_of(h: u32) -> u32 {
    if is_extended(h) {
        h
    } else {
        h & ((1 << 14) - 1)
    }
}
fn is_extended(t: u32) -> bool {
    kind_of(t) == KIND_EXTENDED
}
/// Words a value takes in the cell tagged `t`: none for zero.
fn cost(t: u32, value: u32) -> usize {
    match value {
        0 => 0,
        v if v <= NARROW_MAX && !is_extended(t) => 1,
        _ => 2,
    }
}

/// The value of the cell at `at` (header `h`).
fn value_at(cells: &[AtomicU32], at: usize, h: u32) -> u32 {
    if h & WIDE != 0 {
        load(&cells[at + 1])
    } else {
        h >> VALUE_SHIFT
    }
}

/// The stored cells in order, as `(position, header)`, up to the end
/// marker (the first zero word) or the end of the area.
fn headers(cells: &[AtomicU32]) -> impl Iterator<Item = (usize, u32)> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let h = load(cells.get(at)?);
        if h == 0 {
            return None;
        }
        let here = at;
        at += width(h);
        Some((here, h))
    })
}

/// Words in use (the position of the end marker).
pub fn used(cells: &[AtomicU32]) -> usize {
    headers(cells).last().map_or(0, |(at, h)| at + width(h))
}

/// Calls `f(row, slot, value)` for every slot value held (restored records
/// are skipped). A slot appears once per non-zero component; `f` gets the
/// component in a `PnSlot` with the other one zero.
pub fn for_each(cells: &[AtomicU32], mut f: impl FnMut(usize, usize, PnSlot)) {
    for (at, h) in headers(cells) {
        match component_of(h) {
            Some(KIND_P) => f(
                row_of(h),
                slot_of(h),
                PnSlot {
                    p: value_at(cells, at, h),
                    n: 0,
                },
            ),
            Some(KIND_N) => f(
                row_of(h),
                slot_of(h),
                PnSlot {
                    p: 0,
                    n: value_at(cells, at, h),
                },
            ),
            _ => {}
        }
    }
}

/// The value of `slot` in `row`.
pub fn get(cells: &[AtomicU32], row: usize, slot: usize) -> PnSlot {
    let (p_tag, n_tag) = (tag(row, slot, KIND_P), tag(row, slot, KIND_N));
    let mut out = PnSlot::ZERO;
    for (at, h) in headers(cells) {
        let t = tag_of(h);
        if t == p_tag {
            out.p = value_at(cells, at, h);
        } else if t == n_tag {
            out.n = value_at(cells, at, h);
        }
    }
    out
}

/// Where the cell tagged `t` sits: `(position, width)`, and the words in use.
fn find(cells: &[AtomicU32], t: u32) -> (Option<(usize, usize)>, usize) {
    let mut found = None;
    let mut end = 0;
    for (at, h) in headers(cells) {
        let w = width(h);
        if found.is_none() && tag_of(h) == t && kind_of(h) != KIND_RESTORED {
            found = Some((at, w));
        }
        end = at + w;
    }
    (found, end)
}

/// Removes `w` words at `at` from a list of `used` words.
fn remove(cells: &[AtomicU32], at: usize, w: usize, used: usize) {
    for i in at..used - w {
        store(&cells[i], load(&cells[i + w]));
    }
    for c in &cells[used - w..used] {
        store(c, 0);
    }
}

/// Writes one component cell at `at` (the words are free).
fn write(cells: &[AtomicU32], at: usize, t: u32, value: u32) {
    if value <= NARROW_MAX && !is_extended(t) {
        store(&cells[at], t | (value << VALUE_SHIFT));
    } else {
        store(&cells[at], t | WIDE);
        store(&cells[at + 1], value);
    }
}

/// The words the list would use after [`set`]ting `slot` of `row` to
/// `value`.
pub fn words_after_set(cells: &[AtomicU32], row: usize, slot: usize, value: PnSlot) -> usize {
    let (p, used) = find(cells, tag(row, slot, KIND_P));
    let (n, _) = find(cells, tag(row, slot, KIND_N));
    let old = p.map_or(0, |(_, w)| w) + n.map_or(0, |(_, w)| w);
    used - old + cost(tag(row, slot, KIND_P), value.p) + cost(tag(row, slot, KIND_N), value.n)
}

/// Sets `slot` of `row` to `value`. The caller has checked with
/// [`words_after_set`] that the result fits.
pub fn set(cells: &[AtomicU32], row: usize, slot: usize, value: PnSlot) {
    set_component(cells, tag(row, slot, KIND_P), value.p);
    set_component(cells, tag(row, slot, KIND_N), value.n);
}

fn set_component(cells: &[AtomicU32], t: u32, value: u32) {
    let (found, used) = find(cells, t);
    match found {
        // Same width: in place (the common case, a count growing).
        Some((at, w)) if w == cost(t, value) => write(cells, at, t, value),
        Some((at, w)) => {
            remove(cells, at, w, used);
            if value != 0 {
                write(cells, used - w, t, value);
            }
        }
        None if value != 0 => write(cells, used, t, value),
        None => {}
    }
}

/// Adds `hits` (saturating) to the `p` cell of `slot` in `row` in place
/// and in one pass, when the cell exists and keeps its width; `false`
/// (nothing changed) when it is absent or a narrow cell would outgrow its
/// word: the caller then goes through [`set`].
pub fn add_p_in_place(cells: &[AtomicU32], row: usize, slot: usize, hits: u32) -> bool {
    let t = tag(row, slot, KIND_P);
    let Some((at, h)) = headers(cells).find(|&(_, h)| tag_of(h) == t) else {
        return false;
    };
    if h & WIDE != 0 {
        // A wide (or extended) cell stays so: its value is the next word.
        let v = load(&cells[at + 1]).saturating_add(hits);
        store(&cells[at + 1], v);
        return true;
    }
    // A narrow p cell of this slot: its value is the high bits.
    let v = u64::from(h >> VALUE_SHIFT) + u64::from(hits);
    if v > u64::from(NARROW_MAX) {
        return false;
    }
    store(&cells[at], t | ((v as u32) << VALUE_SHIFT));
    true
}

/// Removes every cell of `row`.
pub fn clear_row(cells: &[AtomicU32], row: usize) {
    let mut read = 0;
    let mut kept = 0;
    while read < cells.len() {
        let h = load(&cells[read]);
        if h == 0 {
            break;
        }
        let w = width(h);
        let drop = kind_of(h) != KIND_RESTORED && row_of(h) == row;
        if !drop {
            for i in 0..w {
                store(&cells[kept + i], load(&cells[read + i]));
            }
            kept += w;
        }
        read += w;
    }
    for c in &cells[kept..read] {
        store(c, 0);
    }
}

/// Adds every row's `(Σp, Σn)` into `sums[row]` in one pass.
pub fn row_sums(cells: &[AtomicU32], sums: &mut [(u64, u64)]) {
    for_each(cells, |row, _, v| {
        if let Some(s) = sums.get_mut(row) {
            s.0 += u64::from(v.p);
            s.1 += u64::from(v.n);
        }
    });
}

/// The restored record, `(epoch low 32 bits, count)`, if any.
pub fn restored(cells: &[AtomicU32]) -> Option<(u32, u32)> {
    let t = tag(0, 0, KIND_RESTORED);
    let (at, _) = headers(cells).find(|&(_, h)| h == t)?;
    Some((load(&cells[at + 1]), load(&cells[at + 2])))
}

/// Words the restored record adds if it is not there yet.
pub fn restored_cost(cells: &[AtomicU32]) -> usize {
    if restored(cells).is_some() {
        0
    } else {
        3
    }
}

/// Stores the restored record (the caller has checked the room).
pub fn set_restored(cells: &[AtomicU32], epoch: u32, count: u32) {
    let t = tag(0, 0, KIND_RESTORED);
    // Over the record if there is one, else at the end of the list.
    let at = match headers(cells).find(|&(_, h)| h == t) {
        Some((at, _)) => at,
        None => used(cells),
    };
    store(&cells[at], t);
    store(&cells[at + 1], epoch);
    store(&cells[at + 2], count);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area(words: usize) -> Vec<AtomicU32> {
        (0..words).map(|_| AtomicU32::new(0)).collect()
    }

    #[test]
    fn only_non_zero_components_take_room() {
        let c = area(16);
        set(&c, 3, 2, PnSlot { p: 5, n: 0 });
        assert_eq!(used(&c), 1);
        set(&c, 3, 2, PnSlot { p: 6, n: 1 });
        assert_eq!(used(&c), 2);
        assert_eq!(get(&c, 3, 2), PnSlot { p: 6, n: 1 });
        assert_eq!(get(&c, 3, 1), PnSlot::ZERO);
        assert_eq!(get(&c, 2, 2), PnSlot::ZERO);
        set(&c, 3, 2, PnSlot::ZERO);
        assert_eq!(used(&c), 0);
    }

    #[test]
    fn adding_in_place_grows_only_a_narrow_p_cell_that_stays_narrow() {
        let c = area(16);
        // Absent: the caller must go through `set`.
        assert!(!add_p_in_place(&c, 2, 1, 1));
        set(&c, 2, 1, PnSlot { p: 4, n: 3 });
        set(&c, 2, 0, PnSlot { p: 9, n: 0 });
        assert!(add_p_in_place(&c, 2, 1, 5));
        assert_eq!(get(&c, 2, 1), PnSlot { p: 9, n: 3 });
        assert_eq!(get(&c, 2, 0), PnSlot { p: 9, n: 0 }, "another slot's cell");
        assert_eq!(used(&c), 3);
        // Up to the narrow maximum in place, not one past it.
        assert!(add_p_in_place(&c, 2, 1, NARROW_MAX - 9));
        assert_eq!(get(&c, 2, 1).p, NARROW_MAX);
        assert!(!add_p_in_place(&c, 2, 1, 1));
        assert_eq!(get(&c, 2, 1).p, NARROW_MAX, "unchanged when refused");
        // A wide cell grows in its value word, up to u32::MAX.
        set(
            &c,
            2,
            1,
            PnSlot {
                p: NARROW_MAX + 1,
                n: 3,
            },
        );
        assert!(add_p_in_place(&c, 2, 1, 1));
        assert_eq!(
            get(&c, 2, 1),
            PnSlot {
                p: NARROW_MAX + 2,
                n: 3
            }
        );
        assert!(add_p_in_place(&c, 2, 1, u32::MAX));
        assert_eq!(get(&c, 2, 1), PnSlot { p: u32::MAX, n: 3 });
        assert_eq!(get(&c, 2, 0), PnSlot { p: 9, n: 0 });
        // A restored record is never taken for a p cell.
        let r = area(8);
        set_restored(&r, 7, 40);
        assert!(!add_p_in_place(&r, 0, 0, 1));
        assert_eq!(restored(&r), Some((7, 40)));
    }

    #[test]
    fn large_values_escape_to_wide_cells_and_back() {
        let c = area(16);
        set(&c, 0, 0, PnSlot { p: 1, n: 0 });
        set(&c, 1, 63, PnSlot { p: 2, n: 0 });
        set(
            &c,
            0,
            0,
            PnSlot {
                p: NARROW_MAX + 1,
                n: u32::MAX,
            },
        );
        assert_eq!(used(&c), 5);
        assert_eq!(
            get(&c, 0, 0),
            PnSlot {
                p: NARROW_MAX + 1,
                n: u32::MAX
            }
        );
        assert_eq!(get(&c, 1, 63), PnSlot { p: 2, n: 0 });
        set(&c, 0, 0, PnSlot { p: 7, n: 0 });
        assert_eq!(used(&c), 2);
        assert_eq!(get(&c, 0, 0), PnSlot { p: 7, n: 0 });
        assert_eq!(
            words_after_set(&c, 0, 0, PnSlot { p: u32::MAX, n: 1 }),
            4,
            "two for the wide p, one for n, one for the other slot"
        );
    }

    #[test]
    fn clearing_a_row_keeps_the_others_and_the_record() {
        let c = area(32);
        for slot in 0..4 {
            set(
                &c,
                1,
                slot,
                PnSlot {
                    p: 1 + slot as u32,
                    n: 0,
                },
            );
            set(&c, 2, slot, PnSlot { p: 200_000, n: 1 });
        }
        set_restored(&c, 77, 9);
        clear_row(&c, 2);
        assert_eq!(used(&c), 4 + 3);
        for slot in 0..4 {
            assert_eq!(get(&c, 1, slot).p, 1 + slot as u32);
            assert_eq!(get(&c, 2, slot), PnSlot::ZERO);
        }
        assert_eq!(restored(&c), Some((77, 9)));
        let mut sums = [(0u64, 0u64); 4];
        row_sums(&c, &mut sums);
        assert_eq!(sums, [(0, 0), (10, 0), (0, 0), (0, 0)]);
        set_restored(&c, 78, 10);
        assert_eq!(restored(&c), Some((78, 10)));
        assert_eq!(used(&c), 7);
    }

    #[test]
    fn a_full_grid_fits_in_the_worst_case() {
        let (buckets, slots) = (4, 3);
        let c = area(worst_words(buckets, slots));
        set_restored(&c, 1, 1);
        for row in 0..buckets {
            for slot in 0..slots {
                let v = PnSlot {
                    p: u32::MAX - row as u32,
                    n: u32::MAX - slot as u32,
                };
                assert!(words_after_set(&c, row, slot, v) <= c.len());
                set(&c, row, slot, v);
            }
        }
        for row in 0..buckets {
            for slot in 0..slots {
                assert_eq!(get(&c, row, slot).p, u32::MAX - row as u32);
            }
        }
        assert_eq!(used(&c), c.len());
    }

    #[test]
    fn slots_past_63_take_extended_cells_of_two_words() {
        let c = area(64);
        // Slot 63 stays compact: one word for a narrow value.
        set(&c, 5, 63, PnSlot { p: 3, n: 0 });
        assert_eq!(used(&c), 1);
        // From 64 on, two words per non-zero component, narrow or not.
        set(&c, 5, 64, PnSlot { p: 3, n: 0 });
        assert_eq!(used(&c), 3);
        set(&c, 5, 255, PnSlot { p: 1, n: 2 });
        assert_eq!(used(&c), 7);
        set(&c, 63, 1000, PnSlot { p: u32::MAX, n: 0 });
        set(
            &c,
            0,
            65535,
            PnSlot {
                p: 7,
                n: NARROW_MAX + 1,
            },
        );
        assert_eq!(used(&c), 13);
        assert_eq!(get(&c, 5, 63), PnSlot { p: 3, n: 0 });
        assert_eq!(get(&c, 5, 64), PnSlot { p: 3, n: 0 });
        assert_eq!(get(&c, 5, 255), PnSlot { p: 1, n: 2 });
        assert_eq!(get(&c, 63, 1000), PnSlot { p: u32::MAX, n: 0 });
        assert_eq!(
            get(&c, 0, 65535),
            PnSlot {
                p: 7,
                n: NARROW_MAX + 1
            }
        );
        // Slots whose low six bits match a compact one are not confused
        // with it (64 vs 0, 1000 vs 40, 65535 vs 63).
        assert_eq!(get(&c, 5, 0), PnSlot::ZERO);
        assert_eq!(get(&c, 63, 40), PnSlot::ZERO);
        assert_eq!(get(&c, 0, 63), PnSlot::ZERO);
        assert_eq!(get(&c, 5, 1064), PnSlot::ZERO);
        // In place, an extended cell grows in its value word.
        assert!(add_p_in_place(&c, 5, 64, NARROW_MAX));
        assert_eq!(get(&c, 5, 64).p, NARROW_MAX + 3);
        assert!(add_p_in_place(&c, 63, 1000, 5), "saturates");
        assert_eq!(get(&c, 63, 1000).p, u32::MAX);
        assert!(!add_p_in_place(&c, 5, 256, 1), "absent");
        assert_eq!(words_after_set(&c, 5, 256, PnSlot { p: 1, n: 1 }), 13 + 4);
        let mut seen = Vec::new();
        for_each(&c, |row, slot, v| seen.push((row, slot, v.p, v.n)));
        seen.sort();
        assert_eq!(
            seen,
            vec![
                (0, 65535, 0, NARROW_MAX + 1),
                (0, 65535, 7, 0),
                (5, 63, 3, 0),
                (5, 64, NARROW_MAX + 3, 0),
                (5, 255, 0, 2),
                (5, 255, 1, 0),
                (63, 1000, u32::MAX, 0),
            ]
        );
        // Zeroing removes the cells; what is left still reads.
        set(&c, 5, 255, PnSlot::ZERO);
        assert_eq!(used(&c), 9);
        clear_row(&c, 5);
        assert_eq!(used(&c), 6);
        assert_eq!(get(&c, 5, 64), PnSlot::ZERO);
        assert_eq!(get(&c, 63, 1000).p, u32::MAX);
    }

    #[test]
    fn a_stored_cell_never_starts_with_a_zero_word() {
        let c = area(32);
        for (row, slot) in [(0, 0), (0, 64), (0, 128), (0, 65535), (63, 64)] {
            set(&c, row, slot, PnSlot { p: 1, n: 1 });
        }
        set_restored(&c, 0, 0);
        let starts: Vec<_> = headers(&c).collect();
        assert_eq!(starts.len(), 11, "ten component cells and the record");
        assert!(starts.iter().all(|&(_, h)| h != 0));
        assert_eq!(restored(&c), Some((0, 0)));
        assert_eq!(get(&c, 0, 0), PnSlot { p: 1, n: 1 });
        assert_eq!(get(&c, 0, 128), PnSlot { p: 1, n: 1 });
    }

    /// A tiny generator (xorshift) so the model test needs no extra crate.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn mixed_slots_values_and_records_read_as_a_map() {
        use std::collections::BTreeMap;
        const SLOTS: [usize; 8] = [0, 1, 63, 64, 255, 1000, 65534, 65535];
        const ROWS: usize = 4;
        let values = [0, 1, 9, NARROW_MAX, NARROW_MAX + 1, 1 << 20, u32::MAX];
        for seed in 1..=40u64 {
            let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let c = area(worst_words(ROWS, SLOTS.len()));
            let mut model: BTreeMap<(usize, usize), PnSlot> = BTreeMap::new();
            let mut record = None;
            for step in 0..300 {
                let row = next(&mut rng) as usize % ROWS;
                let slot = SLOTS[next(&mut rng) as usize % SLOTS.len()];
                let pick = |rng: &mut u64| values[next(rng) as usize % values.len()];
                match next(&mut rng) % 10 {
                    0 => {
                        clear_row(&c, row);
                        model.retain(|&(r, _), _| r != row);
                    }
                    1 => {
                        let r = (next(&mut rng) as u32, next(&mut rng) as u32);
                        assert!(used(&c) + restored_cost(&c) <= c.len());
                        set_restored(&c, r.0, r.1);
                        record = Some(r);
                    }
                    2 | 3 => {
                        let hits = pick(&mut rng);
                        let before = model.get(&(row, slot)).copied().unwrap_or_default();
                        if add_p_in_place(&c, row, slot, hits) {
                            model.insert(
                                (row, slot),
                                PnSlot {
                                    p: before.p.saturating_add(hits),
                                    n: before.n,
                                },
                            );
                        }
                    }
                    _ => {
                        let v = PnSlot {
                            p: pick(&mut rng),
                            n: pick(&mut rng),
                        };
                        assert!(words_after_set(&c, row, slot, v) <= c.len());
                        set(&c, row, slot, v);
                        model.insert((row, slot), v);
                    }
                }
                model.retain(|_, v| *v != PnSlot::ZERO);
                let mut got: BTreeMap<(usize, usize), PnSlot> = BTreeMap::new();
                for_each(&c, |r, s, v| {
                    let e = got.entry((r, s)).or_default();
                    e.p += v.p;
                    e.n += v.n;
                });
                assert_eq!(got, model, "seed {seed} step {step}");
                for (&(r, s), &v) in &model {
                    assert_eq!(get(&c, r, s), v, "seed {seed} step {step}");
                }
                assert_eq!(restored(&c), record, "seed {seed} step {step}");
                // Words in use: one per narrow compact value, two per wide
                // or extended one, three for the record.
                let words: usize = model
                    .iter()
                    .map(|(&(_, s), v)| {
                        [v.p, v.n]
                            .iter()
                            .map(|&x| match x {
                                0 => 0,
                                x if x <= NARROW_MAX && s < 64 => 1,
                                _ => 2,
                            })
                            .sum::<usize>()
                    })
                    .sum();
                assert_eq!(used(&c), words + 3 * usize::from(record.is_some()));
            }
        }
    }
}
