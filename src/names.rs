//! Choices by the names the command line and config files use (serde's names): `FromStr` and
//! `Display` from one list per type, so that the library knows no CLI library, the CLI parses
//! through these, and every refusal names the option and what it allows.

/// `--option must be one of a, b, c, got `s``: the message names the option and what it allows.
pub(crate) fn parse<T: Copy>(s: &str, option: &str, values: &[T], name: fn(T) -> &'static str) -> Result<T, String> {
    values.iter().copied().find(|&v| name(v) == s).ok_or_else(|| {
        let names: Vec<&str> = values.iter().map(|&v| name(v)).collect();
        format!("{option} must be one of {}, got `{s}`", names.join(", "))
    })
}

macro_rules! by_name {
    ($t:ty, $option:literal) => {
        impl std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                $crate::names::parse(s, $option, Self::VALUES, Self::name)
            }
        }

        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

pub(crate) use by_name;

/// Each name parses to its variant, prints as itself and is serde's name for it (config files and
/// the command line agree); an unknown name gets the option and the allowed names.
#[cfg(test)]
pub(crate) fn check_names<T>(values: &[T], option: &str, names: &str)
where
    T: Copy + PartialEq + std::fmt::Debug + std::fmt::Display + std::str::FromStr<Err = String> + serde::Serialize,
{
    for &v in values {
        let name = v.to_string();
        assert_eq!(name.parse::<T>().unwrap(), v);
        assert_eq!(serde_json::to_string(&v).unwrap(), format!("\"{name}\""));
    }
    let err = "nope".parse::<T>().unwrap_err();
    assert_eq!(err, format!("{option} must be one of {names}, got `nope`"));
}

#[cfg(test)]
mod tests {
    use super::check_names;
    use crate::backend::Backend;
    use crate::metrics::Empty;
    use crate::postprocess::Connectivity;

    #[test]
    fn library_choices_parse_print_and_match_serde() {
        check_names(Empty::VALUES, "--empty", "one, nan");
        check_names(Connectivity::VALUES, "--connectivity", "full, face");
        let backends: Vec<String> = Backend::VALUES.iter().map(|b| b.to_string()).collect();
        assert_eq!(backends[0], "flex");
        check_names(Backend::VALUES, "--backend", &backends.join(", "));
    }
}
