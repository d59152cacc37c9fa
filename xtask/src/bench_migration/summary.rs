//! The closing summary of `bench migration`: each figure's median and range over the rounds,
//! and how many rounds met each target.
use std::time::Duration;

use super::{row, Round, COMPARISONS};

/// Median and range over the rounds: of every run's time and downtime, of the ratios the
/// issue's targets are about (with how many rounds met them), and of the link bytes.
pub(super) fn summary(rounds: &[Round]) {
    let spread = |mut v: Vec<f64>, unit: &str, digits: usize| {
        v.sort_by(f64::total_cmp);
        let (lo, mid, hi) = (v[0], v[v.len() / 2], v[v.len() - 1]);
        format!("{mid:.digits$}{unit} ({lo:.digits$} to {hi:.digits$})")
    };
    // Total time, downtime and guest pause of one run.
    let of = |round: &Round, name: &str| -> [f64; 3] {
        let r = row(&round.rows, name);
        [r.total_ms, r.downtime_ms, r.paused_ms].map(|v| v as f64)
    };
    // One of those figures over the rounds.
    let each =
        |name: &str, i: usize| -> Vec<f64> { rounds.iter().map(|x| of(x, name)[i]).collect() };
    println!();
    println!("Over {} rounds: median (lowest to highest).", rounds.len());
    println!();
    println!("| run | total time | downtime | guest paused |");
    println!("| --- | ---: | ---: | ---: |");
    for r in &rounds[0].rows {
        println!(
            "| {} | {} | {} | {} |",
            r.name,
            spread(each(r.name, 0), " ms", 0),
            spread(each(r.name, 1), " ms", 0),
            spread(each(r.name, 2), " ms", 0)
        );
    }
    println!();
    println!("| ratio | total time | downtime | guest paused | rounds with time <= 0.45x | rounds with downtime <= 1.1x |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (label, ours, theirs, targets) in COMPARISONS {
        let ratios = |i: usize| -> Vec<f64> {
            rounds
                .iter()
                .map(|x| of(x, ours)[i] / of(x, theirs)[i].max(1.0))
                .collect()
        };
        let (time, down, paused) = (ratios(0), ratios(1), ratios(2));
        let met = |v: &[f64], limit: f64| match targets {
            true => format!(
                "{} of {}",
                v.iter().filter(|&&x| x <= limit).count(),
                v.len()
            ),
            false => "-".to_string(),
        };
        println!(
            "| {label} | {} | {} | {} | {} | {} |",
            spread(time.clone(), "x", 2),
            spread(down.clone(), "x", 2),
            spread(paused, "x", 2),
            met(&time, 0.45),
            met(&down, 1.1),
        );
    }
    let ms = |f: fn(&Round) -> Duration| {
        spread(
            rounds.iter().map(|r| f(r).as_secs_f64() * 1e3).collect(),
            " ms",
            0,
        )
    };
    println!();
    println!(
        "Touching twice the guest's RAM of fresh memory: {}; again right after freeing it: {}.",
        ms(|r| r.touch.first),
        ms(|r| r.touch.again),
    );
    let pcts = |f: fn(&Round) -> f64| spread(rounds.iter().map(f).collect(), "%", 1);
    let points = |f: fn(&Round) -> f64| {
        spread(
            rounds.iter().map(|r| r.link_pct - f(r)).collect(),
            " points",
            2,
        )
    };
    println!();
    println!(
        "Link bytes (unlimited runs): {} of QEMU's before compression, {} as sent; against the \
         ideal from NAS pages ({}): {}; against the ideal from NAS pages and repeats ({}): {} \
         (before compression; negative: below the ideal).",
        pcts(|r| r.link_pct),
        pcts(|r| r.sent_pct),
        pcts(|r| r.ideal_pct),
        points(|r| r.ideal_pct),
        pcts(|r| r.ideal_dup_pct),
        points(|r| r.ideal_dup_pct),
    );
}
