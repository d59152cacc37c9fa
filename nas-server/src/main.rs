//! `nas-server`: the storage-node daemon's command line.
fn main() -> anyhow::Result<()> {
    anyhow::bail!("nas-server is not implemented yet (issue: nas-server)")
}
