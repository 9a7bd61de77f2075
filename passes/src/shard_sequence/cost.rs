//! The cost model sharding extracts with: seconds per op on one rank, from FLOPs, bytes
//! moved through memory and an alpha-beta model of the links between ranks.
//!
//! A program's cost on a rank is the sum of its ops' costs, each value counted once
//! (`dag_extract`).

use ditto_ir::mesh::{Mesh, SeqMethod};
use ditto_ir::{IrEGraph, Meta, Op};
use egg::{Id, Language};

/// A link between ranks: `latency_s + bytes / bytes_per_s` per message.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Link {
    pub name: &'static str,
    pub latency_s: f64,
    pub bytes_per_s: f64,
}

/// NVLink 4 between H100s (effective, per direction).
pub const NVLINK: Link = Link {
    name: "nvlink",
    latency_s: 5e-6,
    bytes_per_s: 300e9,
};
/// PCIe 4 x16 between GPUs without NVLink.
pub const PCIE: Link = Link {
    name: "pcie",
    latency_s: 15e-6,
    bytes_per_s: 20e9,
};
/// 100 Gb/s Ethernet between nodes.
pub const ETHERNET: Link = Link {
    name: "ethernet",
    latency_s: 30e-6,
    bytes_per_s: 10e9,
};

pub fn link_preset(name: &str) -> Option<Link> {
    match name {
        "nvlink" => Some(NVLINK),
        "pcie" => Some(PCIE),
        "ethernet" => Some(ETHERNET),
        _ => None,
    }
}

/// One rank's device: dense math rate and memory bandwidth (H100, bf16, effective).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Device {
    pub flops_per_s: f64,
    pub bytes_per_s: f64,
    /// Bytes per element of activations on the device (and on the wire).
    pub element_bytes: f64,
}

pub const H100: Device = Device {
    flops_per_s: 500e12,
    bytes_per_s: 2.5e12,
    element_bytes: 2.0,
};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CostModel {
    pub device: Device,
    pub link: Link,
    pub mesh: Mesh,
}

impl CostModel {
    fn mem(&self, elements: usize) -> f64 {
        elements as f64 * self.device.element_bytes / self.device.bytes_per_s
    }
    fn flops(&self, flops: f64) -> f64 {
        flops / self.device.flops_per_s
    }
    /// One message of `elements` over the link.
    fn msg(&self, elements: f64) -> f64 {
        self.link.latency_s + elements * self.device.element_bytes / self.link.bytes_per_s
    }

    /// Predicted seconds of sequence-parallel attention on one rank: local queries
    /// `[b, sq, heads * d]` against keys held `sk` rows per rank.
    #[allow(clippy::too_many_arguments)]
    pub fn seq_attention(
        &self,
        method: SeqMethod,
        b: usize,
        sq: usize,
        sk: usize,
        heads: usize,
        d: usize,
    ) -> f64 {
        let n = self.mesh.sp();
        let width = (heads * d) as f64;
        let padded_heads = |p: usize| heads.div_ceil(p) * p;
        let attn = |q_rows: usize, k_rows: usize, h: usize| {
            self.flops(4.0 * (b * h * q_rows * k_rows * d) as f64)
        };
        match method {
            SeqMethod::Ulysses => {
                let hp = padded_heads(n);
                // q, k, v out and the output back: four all-to-alls of a local tensor, each
                // sending (n-1)/n of it as n-1 messages.
                let local = (b * sq) as f64 * width * hp as f64 / heads as f64;
                let a2a = (n - 1) as f64 * self.msg(local / n as f64);
                4.0 * a2a + attn(sq * n, sk * n, hp / n)
            }
            SeqMethod::Ring => {
                // n steps of local attention; K and V of one block move while the previous
                // block is computed.
                let step = attn(sq, sk, heads);
                let kv = self.msg(2.0 * (b * sk) as f64 * width);
                n as f64 * step + (n - 1) as f64 * (kv - step).max(0.0)
            }
            SeqMethod::Usp => {
                let u = self.mesh.ulysses;
                let r = self.mesh.ring;
                let hp = padded_heads(u);
                let local = (b * sq) as f64 * width * hp as f64 / heads as f64;
                let a2a = (u - 1) as f64 * self.msg(local / u as f64);
                let step = attn(sq * u, sk * u, hp / u);
                let kv = self.msg(2.0 * (b * sk * u) as f64 * width / u as f64);
                4.0 * a2a + r as f64 * step + (r - 1) as f64 * (kv - step).max(0.0)
            }
            SeqMethod::Displaced => {
                // Local queries against every member's keys; the local K/V go to the
                // other members by an all-gather that overlaps the step's compute (in
                // stale mode it carries the next step's keys), so only what exceeds the
                // compute shows.
                let step = attn(sq, sk * n, heads);
                let kv = (n - 1) as f64 * self.msg(2.0 * (b * sk) as f64 * width);
                step + (kv - step).max(0.0)
            }
        }
    }

    /// Own cost of one e-node (seconds), given its class metas.
    pub fn node_cost(&self, eg: &IrEGraph, node: &Op, out: &Meta) -> f64 {
        let numel = |id: Id| eg[id].data.tensor().map_or(0, |t| t.numel());
        let shape = |id: Id| eg[id].data.shape().unwrap_or(&[]).to_vec();
        let int = |id: Id| match eg[id].data {
            Meta::Int(i) => i.max(0) as usize,
            _ => 0,
        };
        let out_n = out.tensor().map_or(0, |t| t.numel());
        match node {
            Op::Int(_) | Op::Float(_) | Op::Name(_) | Op::Input(_) | Op::Weight(_) => 0.0,
            Op::Reshape(_) | Op::Seq(_) | Op::Outputs(_) => 0.0,
            Op::Linear([x, w]) | Op::LinearBias([x, w, _]) => {
                let ws = shape(*w);
                let m = numel(*x) / ws.get(1).copied().unwrap_or(1).max(1);
                self.flops(2.0 * (m * ws[0] * ws[1]) as f64)
                    + self.mem(numel(*x) + numel(*w) + out_n)
            }
            Op::Attention([q, k, v, ..]) => {
                let (qs, ks) = (shape(*q), shape(*k));
                self.flops(4.0 * (qs[0] * qs[1] * ks[1] * qs[2]) as f64)
                    + self.mem(numel(*q) + numel(*k) + numel(*v) + out_n)
            }
            Op::SeqAttention(ch) => {
                let (qs, ks) = (shape(ch[0]), shape(ch[1]));
                let heads = int(ch[3]).max(1);
                let method = match &eg[ch[5]].data {
                    Meta::Name(s) => SeqMethod::parse(s.as_str()).unwrap_or(SeqMethod::Ring),
                    _ => SeqMethod::Ring,
                };
                self.seq_attention(method, qs[0], qs[1], ks[1], heads, qs[2] / heads)
            }
            Op::AllGather(ch) => {
                let parts = int(ch[3]).max(1);
                // A ring all-gather: parts-1 messages of the local tensor.
                (parts - 1) as f64 * self.msg(numel(ch[0]) as f64) + self.mem(out_n)
            }
            Op::Shard(_) => self.mem(out_n),
            Op::Conv2d([x, w, ..]) => {
                let ws = shape(*w);
                self.flops(2.0 * (out_n * ws[1] * ws[2] * ws[3]) as f64)
                    + self.mem(numel(*x) + out_n)
            }
            other => {
                let inputs: usize = other.children().iter().map(|&c| numel(c)).sum();
                self.mem(inputs + out_n)
            }
        }
    }
}
