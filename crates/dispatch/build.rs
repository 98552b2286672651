//! Rebuild when a migration file is added or changed: `embed_migrations!`
//! reads `sql/dispatch` at compile time and cargo would not notice otherwise.
fn main() {
    println!("cargo:rerun-if-changed=../../sql/dispatch");
}
