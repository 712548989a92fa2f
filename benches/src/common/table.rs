//! Plain-text report tables and the number formats they use.

const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

/// Lays `lines` out in columns two spaces apart: the first column (the row name) left-aligned,
/// every other column right-aligned. Each line ends with a newline, without trailing spaces (a
/// line may have fewer cells than others, e.g. a group heading).
pub(crate) fn render(lines: &[Vec<String>]) -> String {
    let columns = lines.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; columns];
    for line in lines {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in lines {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(column, (cell, &width))| {
                if column == 0 {
                    format!("{cell:<width$}")
                } else {
                    format!("{cell:>width$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `"p50/p99"` in µs, as [`micros`] writes them.
pub(crate) fn latencies(p50_us: f64, p99_us: f64) -> String {
    format!("{}/{}", micros(p50_us), micros(p99_us))
}

/// Microseconds with one decimal below 100 µs, whole ones above.
pub(crate) fn micros(us: f64) -> String {
    if us < 100.0 {
        format!("{us:.1}")
    } else {
        format!("{us:.0}")
    }
}

/// A byte count in MiB (one decimal) below 1 GiB, else in GiB (two decimals); whole numbers
/// without decimals.
pub(crate) fn mib_or_gib(bytes: f64) -> String {
    let (value, unit, decimals) = if bytes.abs() >= GIB {
        (bytes / GIB, "GiB", 2)
    } else {
        (bytes / MIB, "MiB", 1)
    };
    if value.fract() == 0.0 {
        format!("{value:.0} {unit}")
    } else {
        format!("{value:.decimals$} {unit}")
    }
}

/// "1 round" or "median of N rounds", for a report's heading.
pub(crate) fn rounds_label(rounds: u32) -> String {
    match rounds {
        1 => "1 round".to_string(),
        n => format!("median of {n} rounds"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_padded_to_the_widest_cell() {
        let lines = vec![
            vec!["row".to_string(), "IOPS".to_string()],
            vec!["4k randread qd32".to_string(), "123456".to_string()],
            vec!["x".to_string(), "7".to_string()],
        ];
        assert_eq!(
            render(&lines),
            "row                 IOPS\n4k randread qd32  123456\nx                      7\n"
        );
        let grouped = vec![
            vec!["qd1".to_string()],
            vec!["  vstor".to_string(), "12".to_string()],
        ];
        assert_eq!(render(&grouped), "qd1\n  vstor  12\n");
    }

    #[test]
    fn number_formats() {
        assert_eq!(micros(31.46), "31.5");
        assert_eq!(micros(142.3), "142");
        assert_eq!(latencies(24.7, 1500.4), "24.7/1500");
        assert_eq!(mib_or_gib((1u64 << 30) as f64), "1 GiB");
        assert_eq!(mib_or_gib(52.5 * MIB), "52.5 MiB");
        assert_eq!(mib_or_gib(1.5 * GIB), "1.50 GiB");
        assert_eq!(rounds_label(1), "1 round");
        assert_eq!(rounds_label(5), "median of 5 rounds");
    }
}
