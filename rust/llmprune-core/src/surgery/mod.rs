//! Pruning that removes whole tensors or leading-axis rows without decoding a value: decoder
//! blocks (`depth`), routed experts (`experts`), and the writer they share (`remap`).

pub mod depth;
pub mod experts;
pub mod remap;
