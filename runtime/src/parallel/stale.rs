//! Displaced attention (`SeqMethod::Displaced`): attention over K/V that persist across the
//! runs (denoising steps) of one generation — DistriFusion, PCPP, and PipeFusion's patches.
//!
//! The staleness lives on the mesh's **ring** axis: its members are the patches whose K/V
//! may be a step old. The **Ulysses** axis, when larger than one, is exact inside: the
//! queries, keys and values go through Ulysses' all-to-all first (every Ulysses member gets
//! its group's rows for its share of the heads), the stores hold those heads only, and the
//! output comes back with the inverse all-to-all. That is how PipeFusion (and DistriFusion)
//! compose with Ulysses; with Ring inside PipeFusion the stage's ring members gather each
//! patch's K/V exactly (see *virtual patches* below).
//!
//! Every displaced attention of a program (identified by its ordinal among the program's
//! displaced attentions) owns a K store and a V store holding the keys of *every* Sp member
//! in the full padded key layout: per key segment `s` (in segment order) `parts * local_s`
//! rows, member `m`'s rows at `[m * local_s, (m + 1) * local_s)` of it, rows at or past
//! `valid_s` being padding (masked). With every segment dividing the part count, this is the
//! unsplit sequence itself, which is why a 1-part and an M-part program of the same graph can
//! share one state (PipeFusion's warmup and patch programs). With Ulysses, a store row is
//! this rank's heads only (`ceil(heads / U) * head_dim` wide).
//!
//! What an attention does with its store depends on the [`StaleState`]:
//! - **Exact** mode (warmup steps, and every step when no staleness is asked): the ring
//!   members all-gather their K and V synchronously into the store (two collectives per
//!   attention) and the queries attend to all of it. Equal to the serial result up to float
//!   rounding.
//! - **Stale** mode (DistriFusion): the fresh K/V overwrite this ring member's slot, the
//!   queries attend to the whole store (the other slots hold the previous step's K/V), and
//!   the attention is queued. After the program's last step, the fresh slots of *all*
//!   queued attentions are exchanged in ONE batched all-gather over the ring and written
//!   into the other members' slots, ready for the next step. DistriFusion overlaps that
//!   gather with the next step's compute; the CPU backend runs it synchronously at the end
//!   of the step (the traffic and the values are the same). A true overlap comes with the
//!   GPU backend (a communication stream, waited for before the next step's first use).
//! - **PCPP** (stale mode with a portion `F`, no Ulysses): per key segment with `local` rows
//!   per member, `w = ceil(F * local)`; the queries of member `i` attend only to rows
//!   `[i * local - w, (i + 1) * local + w)` of each segment (clipped; padding masked), and
//!   the end-of-run exchange sends only those `w` edge rows to each neighbour (`i - 1` gets
//!   the top `w` rows, `i + 1` the bottom `w`; one message per neighbour carrying every
//!   attention's K and V edges). Warmup is the same full all-gather as DistriFusion.
//! - **Virtual patches** ([`StaleState::patch`], PipeFusion): a group of ranks plays an
//!   M-patch program patch by patch ([`Placement`](super::Placement)); the run computes the
//!   patch the state names. `Shard` takes that patch's rows, `AllGather` over Sp gathers the
//!   patch's pieces from the group and writes them into a persistent assembly buffer whose
//!   other rows are as last written, and a displaced attention writes the patch's fresh K/V
//!   into its slots (gathered exactly from the group's ring members) and attends to the
//!   whole store, with no exchange afterwards: the other patches are fresh when computed
//!   earlier in this step, else one step stale.
//!
//! Rows never written since the last [`reset`](StaleState::reset) (no warmup step yet) are
//! masked out rather than attended to as zeros: without warmup, the first step attends to
//! what exists (its own patch, and with virtual patches the patches already computed).

use ditto_codegen::{MeshAxis, Segment};

use super::shard::AxisView;
use super::ulysses::HeadSplit;
use super::{segments, RankCtx, SeqAttn};
use crate::cpu::kernels::attention::attention_masked;
use crate::RuntimeError;

/// Point-to-point tags of PCPP's edge exchange ("stal" in ASCII, high half; low bit: the
/// direction). Messages are matched per (sender, tag) in FIFO order and every member sends
/// one message per direction per step, so two tags serve every step.
const EDGE_DOWN_TAG: u64 = 0x7374_616c << 32;
const EDGE_UP_TAG: u64 = (0x7374_616c << 32) | 1;

/// Which rows `[from, to)` of a member's piece of a segment an operation touches.
type Rows<'a> = &'a dyn Fn(&Segment) -> (usize, usize);

/// How displaced attentions use their stores in the next runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StaleMode {
    /// All-gather the K/V synchronously: exact (warmup steps).
    #[default]
    Exact,
    /// Attend with the other members' K/V of the previous run; exchange after the run.
    Stale,
}

/// Counters of what the displaced attentions did (since creation or the last reset).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StaleStats {
    /// Attentions run in exact mode (K/V gathered synchronously).
    pub exact_attentions: u64,
    /// Attentions run in stale mode (other members' K/V from the previous run).
    pub stale_attentions: u64,
    /// Attentions run for a virtual patch (PipeFusion).
    pub virtual_attentions: u64,
    /// End-of-run exchanges (one batched collective, or one PCPP edge round).
    pub exchanges: u64,
    /// Runs that used the state.
    pub runs: u64,
}

/// Where a displaced attention's keys live: per segment, padded rows (`parts * local`) and
/// valid rows; `batch` and `width` (heads x head_dim) of the keys.
#[derive(Clone, Debug, PartialEq, Eq)]
struct StoreLayout {
    batch: usize,
    width: usize,
    /// (padded, valid) per key segment.
    segments: Vec<(usize, usize)>,
}

impl StoreLayout {
    fn new(batch: usize, width: usize, segs: &[Segment], parts: usize) -> StoreLayout {
        StoreLayout {
            batch,
            width,
            segments: segs.iter().map(|s| (parts * s.local, s.valid)).collect(),
        }
    }
    /// Key rows per batch element.
    fn rows(&self) -> usize {
        self.segments.iter().map(|s| s.0).sum()
    }
    fn len(&self) -> usize {
        self.batch * self.rows() * self.width
    }
}

/// One displaced attention's K and V of every member.
#[derive(Clone, Debug)]
struct KvStore {
    layout: StoreLayout,
    /// `[batch, rows, width]` each.
    k: Vec<f32>,
    v: Vec<f32>,
    /// Per row (the same for every batch element): written since the last reset.
    filled: Vec<bool>,
}

impl KvStore {
    fn new(layout: StoreLayout) -> KvStore {
        let n = layout.len();
        let rows = layout.rows();
        KvStore {
            layout,
            k: vec![0.0; n],
            v: vec![0.0; n],
            filled: vec![false; rows],
        }
    }

    /// Writes rows `rows_of(segment)` of every segment of member `m`'s slot (and marks them
    /// written) from `src_k`/`src_v`, which hold member `m`'s whole local tensor (its local
    /// rows per batch element) unless `packed`, and then only those rows of every segment,
    /// batch-major (what [`read_rows`](Self::read_rows) produces).
    fn write_rows(
        &mut self,
        segs: &[Segment],
        m: usize,
        rows_of: Rows,
        src_k: &[f32],
        src_v: &[f32],
        packed: bool,
    ) {
        let w = self.layout.width;
        let rows = self.layout.rows();
        let src_rows: usize = if packed {
            segs.iter()
                .map(|s| {
                    let (a, b) = rows_of(s);
                    b - a
                })
                .sum()
        } else {
            segments::local_rows(segs)
        };
        for b in 0..self.layout.batch {
            let (mut seg_off, mut src_off) = (0, 0);
            for (s, &(padded, _)) in segs.iter().zip(&self.layout.segments) {
                let (from, to) = rows_of(s);
                let n = to - from;
                let dst_row = seg_off + m * s.local + from;
                let src_row = if packed { src_off } else { src_off + from };
                let d = (b * rows + dst_row) * w;
                let o = (b * src_rows + src_row) * w;
                self.k[d..d + n * w].copy_from_slice(&src_k[o..o + n * w]);
                self.v[d..d + n * w].copy_from_slice(&src_v[o..o + n * w]);
                if b == 0 {
                    self.filled[dst_row..dst_row + n].fill(true);
                }
                seg_off += padded;
                src_off += if packed { n } else { s.local };
            }
        }
    }

    /// Member `m`'s whole slot from its local `k`/`v`.
    fn write_slot(&mut self, segs: &[Segment], m: usize, k: &[f32], v: &[f32]) {
        self.write_rows(segs, m, &|s| (0, s.local), k, v, false);
    }

    /// The slots of `count` consecutive members from `first`, whose local rows `k`/`v` hold
    /// member-major within each batch element (`[batch, count * local, width]`, what
    /// Ulysses' all-to-all gives).
    fn write_members(
        &mut self,
        segs: &[Segment],
        first: usize,
        count: usize,
        k: &[f32],
        v: &[f32],
    ) {
        if count == 1 {
            self.write_slot(segs, first, k, v);
            return;
        }
        let rows = segments::local_rows(segs) * self.layout.width;
        let batch = self.layout.batch;
        let member = |src: &[f32], j: usize| -> Vec<f32> {
            (0..batch)
                .flat_map(|b| src[(b * count + j) * rows..][..rows].iter().copied())
                .collect()
        };
        for j in 0..count {
            self.write_slot(segs, first + j, &member(k, j), &member(v, j));
        }
    }

    /// Member `m`'s local rows as they are in the store (K then V), rows `[from, to)` of
    /// each segment, batch-major, appended to `out`.
    fn read_rows(&self, segs: &[Segment], m: usize, rows_of: Rows, out: &mut Vec<f32>) {
        let w = self.layout.width;
        let rows = self.layout.rows();
        for data in [&self.k, &self.v] {
            for b in 0..self.layout.batch {
                let mut seg_off = 0;
                for (s, &(padded, _)) in segs.iter().zip(&self.layout.segments) {
                    let (from, to) = rows_of(s);
                    let d = (b * rows + seg_off + m * s.local + from) * w;
                    out.extend_from_slice(&data[d..d + (to - from) * w]);
                    seg_off += padded;
                }
            }
        }
    }

    /// Which rows the queries of member `i` attend to: valid (not padding), written, and,
    /// with a PCPP portion, within `w` rows of member `i`'s slot in each segment.
    fn mask(&self, segs: &[Segment], window: Option<(usize, f32)>) -> Vec<bool> {
        let mut mask = Vec::with_capacity(self.layout.rows());
        for (s, &(padded, valid)) in segs.iter().zip(&self.layout.segments) {
            let (lo, hi) = match window {
                Some((i, f)) => {
                    let w = edge_rows(s.local, f);
                    ((i * s.local).saturating_sub(w), (i + 1) * s.local + w)
                }
                None => (0, padded),
            };
            let start = mask.len();
            mask.extend((0..padded).map(|r| r < valid && r >= lo && r < hi));
            for (ok, &filled) in mask[start..].iter_mut().zip(&self.filled[start..]) {
                *ok &= filled;
            }
        }
        mask
    }
}

/// PCPP's edge rows of a segment with `local` rows per member: `ceil(F * local)`.
pub fn edge_rows(local: usize, portion: f32) -> usize {
    ((portion as f64 * local as f64).ceil() as usize).min(local)
}

/// The state that displaced attentions keep across the runs of one generation (per rank).
///
/// Set [`mode`](Self::mode) before each run (exact for warmup steps, stale after), and
/// [`reset`](Self::reset) it between generations. Two programs may share a state (each run
/// addresses the stores by the ordinals of its own displaced attentions) only when their
/// displaced attentions agree in number and key layout; anything else is an error, never a
/// silent mix.
#[derive(Clone, Debug, Default)]
pub struct StaleState {
    pub mode: StaleMode,
    /// PCPP: the portion `F` (0 < F <= 1) of each neighbour's patch attended to in stale
    /// mode; `None`: DistriFusion (every member's K/V).
    pub pcpp_portion: Option<f32>,
    /// Virtual patches (PipeFusion): the patch the next run computes, on an executor built
    /// with `CpuExecutor::placed` (or `virtual_ranks`). The mode does not matter then:
    /// nothing is exchanged after the run, the patch's fresh K/V go straight into the store.
    pub patch: Option<usize>,
    /// By displaced-attention ordinal.
    stores: Vec<KvStore>,
    /// By all-gather ordinal (virtual mode only): the whole gathered tensor.
    assemblies: Vec<Vec<f32>>,
    /// Ordinals of this run's stale-mode attentions, whose fresh slots the end-of-run
    /// exchange sends (the fresh local K/V are the member's own slot of each store).
    queued: Vec<(usize, Vec<Segment>)>,
    next_attention: usize,
    next_gather: usize,
    stats: StaleStats,
}

impl StaleState {
    /// A state in exact mode (the default), for a first warmup run.
    pub fn new(mode: StaleMode) -> StaleState {
        StaleState {
            mode,
            ..Default::default()
        }
    }

    /// The same state with PCPP's portion set (`None`: DistriFusion).
    pub fn with_pcpp_portion(mut self, portion: Option<f32>) -> StaleState {
        self.pcpp_portion = portion;
        self
    }

    /// Forgets every stored K/V and assembly (between generations: the next one must not
    /// attend to this one's keys), the queue and the counters. Mode, PCPP portion and
    /// patch are kept.
    pub fn reset(&mut self) {
        self.stores.clear();
        self.assemblies.clear();
        self.queued.clear();
        self.next_attention = 0;
        self.next_gather = 0;
        self.stats = StaleStats::default();
    }

    /// Bytes of f32 held by the K/V stores (every member's keys and values of every
    /// displaced attention, the memory DistriFusion and PipeFusion pay for staleness).
    pub fn kv_bytes(&self) -> usize {
        self.stores
            .iter()
            .map(|s| (s.k.len() + s.v.len()) * std::mem::size_of::<f32>())
            .sum()
    }

    /// Bytes of f32 held by the virtual-mode assembly buffers.
    pub fn assembly_bytes(&self) -> usize {
        self.assemblies
            .iter()
            .map(|a| a.len() * std::mem::size_of::<f32>())
            .sum()
    }

    /// Number of displaced attentions with a store.
    pub fn stores(&self) -> usize {
        self.stores.len()
    }

    pub fn stats(&self) -> StaleStats {
        self.stats
    }

    /// Checks the settings before a run; called by the executor.
    pub(crate) fn begin_run(&mut self) -> Result<(), RuntimeError> {
        if let Some(f) = self.pcpp_portion {
            if !(f.is_finite() && f > 0.0 && f <= 1.0) {
                return Err(RuntimeError::Input(format!(
                    "the PCPP portion must be in (0, 1], got {f}"
                )));
            }
            if self.patch.is_some() {
                return Err(RuntimeError::Unsupported(
                    "PCPP (a partial neighbour portion) applies to ranks exchanging K/V, not to virtual patches".into(),
                ));
            }
        }
        self.queued.clear();
        self.next_attention = 0;
        self.next_gather = 0;
        self.stats.runs += 1;
        Ok(())
    }

    /// Checks that the run used every store (programs sharing a state must agree).
    pub(crate) fn end_run(&self) -> Result<(), RuntimeError> {
        if self.next_attention != self.stores.len() {
            return Err(RuntimeError::Binding(format!(
                "this program has {} displaced attention(s) but the stale state holds {} K/V \
                 store(s): programs sharing a state must have the same displaced attentions \
                 (reset the state between generations)",
                self.next_attention,
                self.stores.len()
            )));
        }
        if self.next_gather > 0 && self.next_gather != self.assemblies.len() {
            return Err(RuntimeError::Binding(format!(
                "this program has {} sequence all-gather(s) but the stale state holds {} \
                 assembly buffer(s): programs sharing a state must agree",
                self.next_gather,
                self.assemblies.len()
            )));
        }
        Ok(())
    }

    /// The store of the next displaced attention (created on first use).
    fn next_store(&mut self, layout: StoreLayout) -> Result<(usize, &mut KvStore), RuntimeError> {
        let ordinal = self.next_attention;
        self.next_attention += 1;
        if ordinal == self.stores.len() {
            self.stores.push(KvStore::new(layout));
        } else if self.stores[ordinal].layout != layout {
            return Err(RuntimeError::Binding(format!(
                "displaced attention #{ordinal}: its keys are laid out as {:?} (batch {}, width {}) \
                 but the stale state's store holds {:?} (batch {}, width {}): programs sharing a \
                 state must agree (as (padded rows, valid rows) per key segment; a 1-part and an \
                 M-part program agree when every segment divides by M)",
                layout.segments,
                layout.batch,
                layout.width,
                self.stores[ordinal].layout.segments,
                self.stores[ordinal].layout.batch,
                self.stores[ordinal].layout.width,
            )));
        }
        Ok((ordinal, &mut self.stores[ordinal]))
    }
}

/// `Step::SeqAttention` with `SeqMethod::Displaced` (see the module doc).
#[allow(clippy::too_many_arguments)]
pub fn displaced_attention(
    ctx: &mut RankCtx,
    state: &mut StaleState,
    a: &SeqAttn,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
) -> Result<(), RuntimeError> {
    let mesh = ctx.mesh;
    let u = mesh.ulysses;
    let ri = mesh.index(ctx.rank, MeshAxis::Ring);
    let segs = a.key_segments;
    let (mode, portion, patch) = (state.mode, state.pcpp_portion, state.patch);
    let exchange_now = patch.is_some() || mode == StaleMode::Exact;
    if u > 1 && portion.is_some() && !exchange_now {
        return Err(RuntimeError::Unsupported(format!(
            "PCPP (a partial neighbour portion) with Ulysses degree {u}: the window is defined \
             on ring members, each attending with its own rows"
        )));
    }
    // Ulysses inside: this rank's share of the heads for its Ulysses group's rows.
    let split = HeadSplit::new(a.heads, a.head_dim, u);
    let (heads, width) = if u > 1 {
        (split.per_member, split.width())
    } else {
        (a.heads, a.heads * a.head_dim)
    };
    let ugroup = ctx.group(MeshAxis::Ulysses);
    super::around_ulysses(
        ctx,
        &ugroup,
        split,
        a,
        q,
        k,
        v,
        out,
        |ctx, qs, ks, vs, o| {
            let layout = StoreLayout::new(a.batch, width, segs, mesh.sp());
            let (ordinal, store) = state.next_store(layout)?;
            // This ring member's slots: its Ulysses members' rows.
            store.write_members(segs, ri * u, u, ks, vs);
            let window = if exchange_now {
                let members = ctx.members(MeshAxis::Ring);
                if members.len() > 1 {
                    let group = ctx.group(MeshAxis::Ring);
                    let comm = ctx.comm("displaced attention")?;
                    let n = ks.len();
                    let mut gk = vec![0.0f32; members.len() * n];
                    let mut gv = vec![0.0f32; members.len() * n];
                    comm.all_gather(&group, ks, &mut gk)?;
                    comm.all_gather(&group, vs, &mut gv)?;
                    for (j, &m) in members.iter().enumerate() {
                        let r = mesh.index(m, MeshAxis::Ring);
                        if r != ri {
                            let (k, v) = (&gk[j * n..(j + 1) * n], &gv[j * n..(j + 1) * n]);
                            store.write_members(segs, r * u, u, k, v);
                        }
                    }
                }
                if patch.is_some() {
                    state.stats.virtual_attentions += 1;
                } else {
                    state.stats.exact_attentions += 1;
                }
                None
            } else {
                state.queued.push((ordinal, segs.to_vec()));
                state.stats.stale_attentions += 1;
                portion.map(|f| (ri, f))
            };
            let store = &state.stores[ordinal];
            let mask = store.mask(segs, window);
            attend(
                qs,
                store,
                &mask,
                a.batch,
                u * a.sq,
                heads,
                a.head_dim,
                a.scale,
                o,
            );
            Ok(())
        },
    )
}

/// Attention of `q` over the store's keys where `mask` is true. When many keys are masked
/// (PCPP's window), the kept rows are copied together first, so the work is that of the
/// window only.
#[allow(clippy::too_many_arguments)]
fn attend(
    q: &[f32],
    store: &KvStore,
    mask: &[bool],
    batch: usize,
    sq: usize,
    heads: usize,
    head_dim: usize,
    scale: f32,
    out: &mut [f32],
) {
    let rows = store.layout.rows();
    let kept = mask.iter().filter(|&&ok| ok).count();
    if kept == rows {
        attention_masked(
            q, &store.k, &store.v, batch, sq, rows, heads, head_dim, scale, None, out, None,
        );
        return;
    }
    if kept * 8 >= rows * 7 {
        attention_masked(
            q,
            &store.k,
            &store.v,
            batch,
            sq,
            rows,
            heads,
            head_dim,
            scale,
            Some(mask),
            out,
            None,
        );
        return;
    }
    let w = heads * head_dim;
    let mut kc = Vec::with_capacity(batch * kept * w);
    let mut vc = Vec::with_capacity(batch * kept * w);
    for b in 0..batch {
        for (r, _) in mask.iter().enumerate().filter(|(_, &ok)| ok) {
            let o = (b * rows + r) * w;
            kc.extend_from_slice(&store.k[o..o + w]);
            vc.extend_from_slice(&store.v[o..o + w]);
        }
    }
    attention_masked(
        q, &kc, &vc, batch, sq, kept, heads, head_dim, scale, None, out, None,
    );
}

/// The end-of-run exchange of stale mode: every queued attention's fresh slots go to the
/// other ring members (DistriFusion: one all-gather of all of them; PCPP: the edge rows to
/// each neighbour, one message per direction), written into their stores for the next run.
/// Nothing to do after an exact or virtual-patch run.
pub fn finish_run(ctx: &mut RankCtx, state: &mut StaleState) -> Result<(), RuntimeError> {
    state.end_run()?;
    if state.queued.is_empty() {
        return Ok(());
    }
    let queued = std::mem::take(&mut state.queued);
    // Stale slots are per ring member; with Ulysses inside, a ring member's slots are its
    // Ulysses members' rows (this rank's heads of them).
    let group = ctx.group(MeshAxis::Ring);
    let p = group.size();
    let me = ctx.mesh.index(ctx.rank, MeshAxis::Ring);
    let u = ctx.mesh.ulysses;
    if p == 1 {
        return Ok(());
    }
    let whole = |s: &Segment| (0, s.local);
    match state.pcpp_portion {
        None => {
            let mut mine = Vec::new();
            for (ordinal, segs) in &queued {
                for j in 0..u {
                    state.stores[*ordinal].read_rows(segs, me * u + j, &whole, &mut mine);
                }
            }
            let n = mine.len();
            let mut all = vec![0.0f32; p * n];
            ctx.comm("displaced attention exchange")?
                .all_gather(&group, &mine, &mut all)?;
            for m in (0..p).filter(|&m| m != me) {
                let mut at = m * n;
                for (ordinal, segs) in &queued {
                    let store = &mut state.stores[*ordinal];
                    let len = store.layout.batch * segments::local_rows(segs) * store.layout.width;
                    for j in 0..u {
                        let (k, rest) = all[at..].split_at(len);
                        store.write_slot(segs, m * u + j, k, &rest[..len]);
                        at += 2 * len;
                    }
                }
            }
        }
        Some(f) => {
            let top = |s: &Segment| (0, edge_rows(s.local, f));
            let bottom = |s: &Segment| (s.local - edge_rows(s.local, f), s.local);
            let (next, prev) = ((me + 1 < p).then_some(me + 1), me.checked_sub(1));
            // Down: my bottom edges to i + 1, the bottom edges of i - 1 from it. Up: my top
            // edges to i - 1, the top edges of i + 1 from it. Sends are eager, so the chain
            // cannot deadlock.
            let phases: [(Rows, _, _, u64); 2] = [
                (&bottom, next, prev, EDGE_DOWN_TAG),
                (&top, prev, next, EDGE_UP_TAG),
            ];
            for (rows_of, to, from, tag) in phases {
                let edge_len = |store: &KvStore, segs: &[Segment]| {
                    let r: usize = segs.iter().map(|s| rows_of(s).1 - rows_of(s).0).sum();
                    store.layout.batch * r * store.layout.width
                };
                let mut payload = Vec::new();
                if to.is_some() {
                    for (ordinal, segs) in &queued {
                        state.stores[*ordinal].read_rows(segs, me, rows_of, &mut payload);
                    }
                }
                let n: usize = queued
                    .iter()
                    .map(|(o, segs)| 2 * edge_len(&state.stores[*o], segs))
                    .sum();
                let mut received = vec![0.0f32; if from.is_some() { n } else { 0 }];
                let comm = ctx.comm("PCPP edge exchange")?;
                match (to, from) {
                    (Some(t), Some(fr)) => comm.sendrecv(
                        group.ranks[t],
                        &payload,
                        group.ranks[fr],
                        &mut received,
                        tag,
                    )?,
                    (Some(t), None) => comm.send(group.ranks[t], tag, &payload)?,
                    (None, Some(fr)) => comm.recv(group.ranks[fr], tag, &mut received)?,
                    (None, None) => {}
                }
                // The sender's edge rows, into its slot of our stores.
                if let Some(fr) = from {
                    let mut at = 0;
                    for (ordinal, segs) in &queued {
                        let store = &mut state.stores[*ordinal];
                        let len = edge_len(store, segs);
                        let (k, rest) = received[at..].split_at(len);
                        store.write_rows(segs, fr, rows_of, k, &rest[..len], true);
                        at += 2 * len;
                    }
                }
            }
        }
    }
    state.stats.exchanges += 1;
    Ok(())
}

/// `Step::AllGather` over the Sp axis for a virtual patch: the patch's pieces, gathered
/// from the members playing it, go into the persistent assembly buffer of this gather (by
/// ordinal), and the output is all of it (the other patches as last written).
pub fn virtual_all_gather(
    ctx: &mut RankCtx,
    state: &mut StaleState,
    x: &[f32],
    x_shape: &[usize],
    axis: usize,
    segs: &[Segment],
    out: &mut [f32],
) -> Result<(), RuntimeError> {
    let ordinal = state.next_gather;
    state.next_gather += 1;
    if ordinal == state.assemblies.len() {
        state.assemblies.push(vec![0.0; out.len()]);
    }
    let buf = &mut state.assemblies[ordinal];
    if buf.len() != out.len() {
        return Err(RuntimeError::Binding(format!(
            "all-gather #{ordinal}: {} elements, but the stale state's assembly buffer holds {}: \
             programs sharing a state must agree",
            out.len(),
            buf.len()
        )));
    }
    let view = AxisView::new(x_shape, axis);
    let members = ctx.members(MeshAxis::Sp);
    if members.len() == 1 {
        let me = ctx.mesh.index(ctx.rank, MeshAxis::Sp);
        super::shard::assemble_member(x, view, segs, me, buf);
    } else {
        let group = ctx.group(MeshAxis::Sp);
        let mut gathered = vec![0.0f32; members.len() * x.len()];
        ctx.comm("all_gather")?
            .all_gather(&group, x, &mut gathered)?;
        for (j, &m) in members.iter().enumerate() {
            let piece = &gathered[j * x.len()..(j + 1) * x.len()];
            let index = ctx.mesh.index(m, MeshAxis::Sp);
            super::shard::assemble_member(piece, view, segs, index, buf);
        }
    }
    out.copy_from_slice(buf);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::kernels::attention::attention;

    fn seg(local: usize, valid: usize) -> Segment {
        Segment { local, valid }
    }

    #[test]
    fn store_layout_of_one_and_of_m_parts_coincide_when_segments_divide() {
        let one = StoreLayout::new(2, 8, &[seg(12, 12), seg(4, 4)], 1);
        let four = StoreLayout::new(2, 8, &[seg(3, 12), seg(1, 4)], 4);
        assert_eq!(one, four);
        let padded = StoreLayout::new(2, 8, &[seg(4, 10)], 3);
        assert_ne!(StoreLayout::new(2, 8, &[seg(10, 10)], 1), padded);
    }

    #[test]
    fn pcpp_window_and_padding_mask() {
        // One segment of 10 valid rows over 3 members (local 4: 2 rows of padding).
        let segs = [seg(4, 10)];
        let mut s = KvStore::new(StoreLayout::new(1, 1, &segs, 3));
        s.filled.fill(true);
        // F = 0.3: w = ceil(1.2) = 2; member 1 sees rows [2, 10).
        let m = s.mask(&segs, Some((1, 0.3)));
        let want: Vec<bool> = (0..12).map(|r| (2..10).contains(&r)).collect();
        assert_eq!(m, want);
        // Member 2 (the last): rows [6, 14) clipped, padding rows 10, 11 masked.
        let m = s.mask(&segs, Some((2, 0.3)));
        let want: Vec<bool> = (0..12).map(|r| (6..10).contains(&r)).collect();
        assert_eq!(m, want);
        // Unwritten rows are masked.
        s.filled[0] = false;
        assert!(!s.mask(&segs, None)[0]);
        assert_eq!(edge_rows(4, 1.0), 4);
        assert_eq!(edge_rows(5, 0.01), 1);
    }

    #[test]
    fn slots_edges_and_attention_over_a_full_store() {
        // Two segments (6 and 2 rows) over 2 members; batch 2, width 2 (1 head of 2).
        let segs = [seg(3, 6), seg(1, 2)];
        let layout = StoreLayout::new(2, 2, &segs, 2);
        let mut s = KvStore::new(layout);
        // The full keys [2, 8, 2], in segment order, and each member's local rows.
        let full: Vec<f32> = (0..32).map(|i| (i as f32 * 0.37).sin()).collect();
        let local = |m: usize| -> Vec<f32> {
            let mut out = Vec::new();
            for b in 0..2 {
                for (s0, sg) in [(0, 3), (6, 1)] {
                    let from = (b * 8 + s0 + m * sg) * 2;
                    out.extend_from_slice(&full[from..from + sg * 2]);
                }
            }
            out
        };
        for m in 0..2 {
            s.write_slot(&segs, m, &local(m), &local(m));
        }
        assert_eq!(s.k, full);
        assert!(s.filled.iter().all(|&f| f));
        // Edge rows read back as written, packed.
        let mut top = Vec::new();
        s.read_rows(
            &segs,
            1,
            &|sg: &Segment| (0, edge_rows(sg.local, 0.5)),
            &mut top,
        );
        // Member 1's top 2 image rows and its 1 text row, per batch, K then V.
        let mut want = Vec::new();
        for b in 0..2 {
            want.extend_from_slice(&full[(b * 8 + 3) * 2..(b * 8 + 5) * 2]);
            want.extend_from_slice(&full[(b * 8 + 7) * 2..(b * 8 + 8) * 2]);
        }
        let kv: Vec<f32> = want.iter().chain(&want).copied().collect();
        assert_eq!(top, kv);
        // Writing them packed into a fresh store lands in the same rows.
        let mut t = KvStore::new(s.layout.clone());
        t.write_rows(
            &segs,
            1,
            &|sg: &Segment| (0, edge_rows(sg.local, 0.5)),
            &top[..want.len()],
            &top[want.len()..],
            true,
        );
        let filled: Vec<usize> = (0..8).filter(|&r| t.filled[r]).collect();
        assert_eq!(filled, [3, 4, 7]);
        // Attention over the full store equals plain attention over the full keys.
        let q: Vec<f32> = (0..12).map(|i| (i as f32 * 0.7).cos()).collect();
        let (mut o1, mut o2) = (vec![0.0; 12], vec![0.0; 12]);
        let mask = s.mask(&segs, None);
        attend(&q, &s, &mask, 2, 3, 1, 2, 0.5, &mut o1);
        attention(&q, &full, &full, 2, 3, 8, 1, 2, 0.5, &mut o2);
        for (a, b) in o1.iter().zip(&o2) {
            assert!((a - b).abs() < 1e-6, "{a} {b}");
        }
    }
}
