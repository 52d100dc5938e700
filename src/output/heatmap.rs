//! The learned composition weights as a picture: groups (rows) x adapters
//! (columns), one cell each, shaded by weight. Plain SVG, written by hand:
//! it renders on the Hub and in any browser, and needs no plotting stack.

use std::fmt::Write;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// White (0) to deep blue (the largest weight); negative weights, which
/// softmax never gives, would show in red.
fn color(w: f64, max: f64) -> String {
    let t = if max > 0.0 {
        (w.abs() / max).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let (r, g, b) = if w >= 0.0 {
        (8.0, 69.0, 148.0)
    } else {
        (165.0, 15.0, 21.0)
    };
    let mix = |c: f64| (255.0 + (c - 255.0) * t).round() as u8;
    format!("#{:02x}{:02x}{:02x}", mix(r), mix(g), mix(b))
}

/// `weights[g][i]` is group g's weight of adapter i.
pub fn weights_svg(
    title: &str,
    groups: &[String],
    adapters: &[String],
    weights: &[Vec<f64>],
) -> String {
    let cell_w = 56.0;
    let cell_h = 16.0;
    // Column labels run upwards; long references keep their end, where
    // names differ (the full reference is the tooltip).
    let short = |a: &str| -> String {
        let n = a.chars().count();
        if n <= 32 {
            a.to_string()
        } else {
            format!("…{}", a.chars().skip(n - 31).collect::<String>())
        }
    };
    let label_w = 8.0 + 6.5 * groups.iter().map(|g| g.chars().count()).max().unwrap_or(4) as f64;
    let longest = adapters
        .iter()
        .map(|a| short(a).chars().count())
        .max()
        .unwrap_or(4);
    let top = 30.0 + 6.5 * longest as f64;
    let width = label_w + cell_w * adapters.len() as f64 + 20.0;
    let height = top + cell_h * groups.len() as f64 + 30.0;
    let max = weights.iter().flatten().fold(0.0f64, |m, w| m.max(w.abs()));
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="4" y="14" font-size="13">{}</text>"#,
        esc(title)
    );
    for (i, a) in adapters.iter().enumerate() {
        let x = label_w + cell_w * (i as f64 + 0.5) + 4.0;
        let y = top - 6.0;
        let _ = writeln!(
            s,
            r#"<text x="{x:.1}" y="{y:.1}" transform="rotate(-90 {x:.1} {y:.1})"><title>{}</title>{}</text>"#,
            esc(a),
            esc(&short(a))
        );
    }
    for (g, name) in groups.iter().enumerate() {
        let y = top + cell_h * g as f64;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            label_w - 4.0,
            y + cell_h - 4.0,
            esc(name)
        );
        for (i, w) in weights.get(g).into_iter().flatten().enumerate() {
            let x = label_w + cell_w * i as f64;
            let fill = color(*w, max);
            let ink = if w.abs() > 0.6 * max {
                "white"
            } else {
                "black"
            };
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{cell_w}" height="{cell_h}" fill="{fill}" stroke="white"/><text x="{:.1}" y="{:.1}" text-anchor="middle" fill="{ink}">{w:.3}</text>"#,
                x + cell_w / 2.0,
                y + cell_h - 4.0
            );
        }
    }
    let _ = writeln!(
        s,
        r##"<text x="4" y="{:.1}" fill="#555">rows: weight groups; columns: adapters; each row sums to 1</text>"##,
        height - 10.0
    );
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_cell_per_weight_shaded_by_size() {
        let svg = weights_svg(
            "learned <weights>",
            &["layer 0".into(), "layer 1".into()],
            &["a".into(), "b".into()],
            &[vec![0.75, 0.25], vec![0.5, 0.5]],
        );
        assert_eq!(svg.matches("<rect x=").count(), 4);
        assert!(svg.contains(">0.750<") && svg.contains(">0.250<"));
        assert!(svg.contains("learned &lt;weights&gt;"));
        // The largest weight is the darkest cell, zero would be white.
        assert_eq!(color(0.75, 0.75), "#084594");
        assert_eq!(color(0.0, 0.75), "#ffffff");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    }
}
