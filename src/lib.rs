pub mod error;
pub mod io;
pub mod models;
pub mod tokenizer;
pub use error::{Error, Result};
