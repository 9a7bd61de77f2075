use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum IrError {
    /// Operands that do not fit the op. Names the op and every operand's shape.
    #[error("shape error in `{op}` (operands: {operands}): {reason}")]
    Shape {
        op: String,
        operands: String,
        reason: String,
    },
    #[error("IR text line {line}: {reason}")]
    Parse { line: usize, reason: String },
    #[error("IR verification failed at %{node} (`{op}`): {reason}")]
    Verify {
        node: usize,
        op: String,
        reason: String,
    },
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = IrError> = std::result::Result<T, E>;
