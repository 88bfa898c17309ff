//! Draws the plots of `docs/BENCHMARKS.md` from the load generator's JSON.
//!
//! ```sh
//! cargo run --release --example loadgen -- --json docs/benchmarks/loadgen.json
//! cargo run --release --example bench_plot -- docs/benchmarks/loadgen.json docs
//! ```
//!
//! (`scripts/plot-benchmarks.sh` runs both.) Writes
//! `latency-vs-concurrency.svg` (p50 and p99 time to `message.completed`,
//! gateway vs the direct pipe, log-log) and `throughput-vs-concurrency.svg`
//! into the output folder. SVG text is left to the viewer's fonts, so no
//! font files are needed here.

use std::path::PathBuf;

use plotters::prelude::*;
use serde_json::Value;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let input = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "docs/benchmarks/loadgen.json".into()),
    );
    let out = PathBuf::from(args.next().unwrap_or_else(|| "docs".into()));
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&input)?)?;
    let sweep = report["sweep"]
        .as_array()
        .ok_or("the JSON has no `sweep` (run loadgen with the sweep scenario)")?;
    let point = |p: &Value, driver: &str, key: &str| -> (f64, f64) {
        (
            p["concurrency"].as_f64().unwrap_or(0.0),
            p[driver]["done"][key].as_f64().unwrap_or(f64::NAN),
        )
    };
    let series = |driver: &str, key: &str| -> Vec<(f64, f64)> {
        sweep.iter().map(|p| point(p, driver, key)).collect()
    };
    let machine = format!(
        "{} × {}",
        report["machine"]["nproc"],
        report["machine"]["cpu"].as_str().unwrap_or("?")
    );

    let lines = [
        ("gateway p99", series("gateway", "p99_ms"), RED, true),
        ("gateway p50", series("gateway", "p50_ms"), RED, false),
        ("direct pipe p99", series("direct", "p99_ms"), BLUE, true),
        ("direct pipe p50", series("direct", "p50_ms"), BLUE, false),
    ];
    let max_c = sweep
        .iter()
        .filter_map(|p| p["concurrency"].as_f64())
        .fold(1.0, f64::max);
    let all: Vec<f64> = lines
        .iter()
        .flat_map(|l| l.1.iter().map(|p| p.1))
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let (lo, hi) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
    let path = out.join("latency-vs-concurrency.svg");
    {
        let root = SVGBackend::new(&path, (800, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("Time to message.completed vs concurrent sessions ({machine})"),
                ("sans-serif", 18),
            )
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(65)
            .build_cartesian_2d(
                (0.8..max_c * 1.25).log_scale(),
                (lo * 0.7..hi * 1.5).log_scale(),
            )?;
        chart
            .configure_mesh()
            .x_desc("concurrent sessions, closed loop (sed -u 'a __END__')")
            .y_desc("latency (ms, log)")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v}"))
            .draw()?;
        for (name, data, color, solid) in lines {
            let data: Vec<(f64, f64)> = data.into_iter().filter(|p| p.1.is_finite()).collect();
            let style = if solid {
                color.stroke_width(2)
            } else {
                color.mix(0.5).stroke_width(2)
            };
            chart
                .draw_series(LineSeries::new(data.clone(), style))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            chart.draw_series(data.iter().map(|p| Circle::new(*p, 3, style.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    println!("wrote {}", path.display());

    let rate = |driver: &str| -> Vec<(f64, f64)> {
        sweep
            .iter()
            .map(|p| {
                (
                    p["concurrency"].as_f64().unwrap_or(0.0),
                    p[driver]["per_s"].as_f64().unwrap_or(f64::NAN) / 1000.0,
                )
            })
            .collect()
    };
    let floor: Vec<(f64, f64)> = report["floor"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    (
                        p["concurrency"].as_f64().unwrap_or(0.0),
                        p["per_s"].as_f64().unwrap_or(f64::NAN) / 1000.0,
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let top = rate("direct")
        .iter()
        .chain(rate("gateway").iter())
        .chain(floor.iter())
        .map(|p| p.1)
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max);
    let path = out.join("throughput-vs-concurrency.svg");
    {
        let root = SVGBackend::new(&path, (800, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("Messages per second vs concurrent sessions ({machine})"),
                ("sans-serif", 18),
            )
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(65)
            .build_cartesian_2d((0.8..max_c * 1.25).log_scale(), 0.0..top * 1.4)?;
        chart
            .configure_mesh()
            .x_desc("concurrent sessions, closed loop")
            .y_desc("thousand messages (requests) / s")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        let mut lines = vec![
            ("direct pipe", rate("direct"), BLUE),
            ("gateway (SSE message)", rate("gateway"), RED),
        ];
        if !floor.is_empty() {
            lines.push(("HTTP floor: GET /healthz", floor, BLACK));
        }
        for (name, data, color) in lines {
            let style = color.stroke_width(2);
            chart
                .draw_series(LineSeries::new(data.clone(), style))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            chart.draw_series(data.iter().map(|p| Circle::new(*p, 3, style.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    println!("wrote {}", path.display());
    Ok(())
}
