//! docs/benchmarks.svg: overhead against the unmonitored floor, per setup, connect and exec side
//! by side.

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

use crate::report::{Op, overhead_pct};
use crate::run::{Results, Setup};

pub fn overhead_svg(r: &Results, path: &Path) -> anyhow::Result<()> {
    let setups: Vec<Setup> = Setup::ALL
        .into_iter()
        .filter(|s| *s != Setup::NoMonitor)
        .collect();
    let bars: Vec<(usize, f64, f64)> = setups
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            (
                i,
                overhead_pct(r, s, Op::Connect),
                overhead_pct(r, s, Op::Exec),
            )
        })
        .collect();
    let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
    let hi = bars
        .iter()
        .flat_map(|b| [finite(b.1), finite(b.2)])
        .fold(10.0_f64, f64::max)
        * 1.15;
    let lo = bars
        .iter()
        .flat_map(|b| [finite(b.1), finite(b.2)])
        .fold(0.0_f64, f64::min)
        * 1.15;
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Overhead per operation against no monitor, % (median of interleaved repetitions)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..(setups.len() as f64 - 0.5), lo..hi)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(setups.len())
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                setups
                    .get(i as usize)
                    .map_or(String::new(), |s| s.short().to_string())
            } else {
                String::new()
            }
        })
        .y_desc("overhead, %")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(|e| err(&e))?;
    let connect = RGBColor(31, 119, 180);
    let exec = RGBColor(255, 127, 14);
    chart
        .draw_series(bars.iter().map(|&(i, c, _)| {
            let x = i as f64;
            Rectangle::new([(x - 0.38, 0.0), (x - 0.02, finite(c))], connect.filled())
        }))
        .map_err(|e| err(&e))?
        .label("connect")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], connect.filled()));
    chart
        .draw_series(bars.iter().map(|&(i, _, e)| {
            let x = i as f64;
            Rectangle::new([(x + 0.02, 0.0), (x + 0.38, finite(e))], exec.filled())
        }))
        .map_err(|e| err(&e))?
        .label("fork+exec")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], exec.filled()));
    // Values on the bars: the small ones are the point of the chart and would be invisible.
    for &(i, c, e) in &bars {
        for (dx, v) in [(-0.2, c), (0.2, e)] {
            let y = finite(v);
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("{v:+.1}"),
                    (
                        i as f64 + dx - 0.12,
                        if y >= 0.0 {
                            y + hi * 0.05
                        } else {
                            y - hi * 0.01
                        },
                    ),
                    ("sans-serif", 12),
                )))
                .map_err(|e| err(&e))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
