//! What the analysis knows about each value: shape, dtype and distribution for tensors, the
//! value itself for attributes.

use std::fmt;

use egg::Symbol;
use serde::{Deserialize, Serialize};

use crate::DType;

/// How a tensor is laid out over the ranks. Filled by the sharding passes; everything the
/// model builders produce is `Replicated`.
/// Names of the mesh axes, as the IR text spells them (`Dist::Split::mesh_axis` indexes it).
pub const MESH_AXES: [&str; 4] = ["cfg", "sp", "ulysses", "ring"];

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum Dist {
    #[default]
    Replicated,
    /// Split into `parts` equal chunks along `axis` over mesh axis `mesh_axis`.
    Split {
        axis: usize,
        parts: usize,
        mesh_axis: usize,
    },
}

#[derive(Clone, Debug, Eq)]
pub struct TensorMeta {
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub dist: Dist,
}

// The distribution is an annotation derived from the ops (shown in dumps); two tensors are
// the same value when shape and dtype agree, whatever form produced them.
impl PartialEq for TensorMeta {
    fn eq(&self, other: &TensorMeta) -> bool {
        self.shape == other.shape && self.dtype == other.dtype
    }
}

impl TensorMeta {
    pub fn new(shape: Vec<usize>, dtype: DType) -> Self {
        TensorMeta {
            shape,
            dtype,
            dist: Dist::Replicated,
        }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Analysis data of one value (an e-class, or a node of a `Graph`).
#[derive(Clone, Debug)]
pub enum Meta {
    Tensor(TensorMeta),
    Int(i64),
    Float(f64),
    Name(Symbol),
    /// The `outputs` root.
    Outputs,
    /// A node whose operands do not fit (only reachable through a faulty rewrite: the builder
    /// refuses such nodes up front). The verifier reports it.
    Invalid(String),
}

// Floats compare by bits so a NaN attribute equals itself (the verifier compares metas).
impl PartialEq for Meta {
    fn eq(&self, other: &Meta) -> bool {
        match (self, other) {
            (Meta::Tensor(a), Meta::Tensor(b)) => a == b,
            (Meta::Int(a), Meta::Int(b)) => a == b,
            (Meta::Float(a), Meta::Float(b)) => a.to_bits() == b.to_bits(),
            (Meta::Name(a), Meta::Name(b)) => a == b,
            (Meta::Outputs, Meta::Outputs) => true,
            (Meta::Invalid(a), Meta::Invalid(b)) => a == b,
            _ => false,
        }
    }
}

impl Meta {
    pub fn tensor(&self) -> Option<&TensorMeta> {
        match self {
            Meta::Tensor(t) => Some(t),
            _ => None,
        }
    }
    pub fn shape(&self) -> Option<&[usize]> {
        self.tensor().map(|t| t.shape.as_slice())
    }
}

/// `[2, 4, 16]` style, as shape errors print it.
pub struct ShapeDisplay<'a>(pub &'a [usize]);

impl fmt::Display for ShapeDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}

impl fmt::Display for Meta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Meta::Tensor(t) => {
                write!(f, "{}{}", t.dtype, ShapeDisplay(&t.shape))?;
                if let Dist::Split {
                    axis,
                    parts,
                    mesh_axis,
                } = &t.dist
                {
                    write!(
                        f,
                        " split(axis {axis}, {parts} ranks, mesh {})",
                        MESH_AXES[*mesh_axis]
                    )?;
                }
                Ok(())
            }
            Meta::Int(i) => write!(f, "{i}"),
            Meta::Float(x) => write!(f, "{x:?}"),
            Meta::Name(s) => write!(f, "{s}"),
            Meta::Outputs => write!(f, "outputs"),
            Meta::Invalid(why) => write!(f, "invalid({why})"),
        }
    }
}
