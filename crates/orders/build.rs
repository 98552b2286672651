//! Rebuild when a migration changes: `embed_migrations!` reads `sql/orders` at compile time.
fn main() {
    println!("cargo:rerun-if-changed=../../sql/orders");
}
