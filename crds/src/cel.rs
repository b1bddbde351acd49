//! The functions Weir's CEL expressions can call, and [`check`], which refuses an expression
//! calling anything else.
//!
//! [`FUNCTIONS`] is the one list: the standard library, the strings extension and Weir's own
//! functions (implemented by the worker, which proves in its tests that every entry runs as
//! its example says), plus the macros the parser expands. `docs/functions.md` is generated
//! from it.

use std::sync::LazyLock;

use ::cel::common::ast::{EntryExpr, Expr, IdedExpr, LiteralValue};

mod table;

pub use table::FUNCTIONS;

/// How a function is called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// `f(x, ..)`.
    Global,
    /// `x.f(..)`, on a value of the type named here (for the docs; `value` for several).
    Member(&'static str),
}

/// Where a function is listed in the docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Group {
    Strings,
    Regex,
    Time,
    Hashing,
    Conversions,
    Collections,
    Optional,
}

impl Group {
    /// Every group, in the order of the docs.
    pub const ALL: [Group; 7] = [
        Group::Strings,
        Group::Regex,
        Group::Time,
        Group::Hashing,
        Group::Conversions,
        Group::Collections,
        Group::Optional,
    ];

    pub fn title(self) -> &'static str {
        match self {
            Group::Strings => "Strings",
            Group::Regex => "Regular expressions",
            Group::Time => "Time",
            Group::Hashing => "Hashing and ids",
            Group::Conversions => "Conversions",
            Group::Collections => "Lists and maps",
            Group::Optional => "Optional values",
        }
    }
}

/// What an example evaluates to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expected {
    /// A CEL expression for the exact result, e.g. `'ada@example.com'` or `[2, 4]`.
    Value(&'static str),
    /// A result that differs on every call (random salts, ids), described.
    Varies(&'static str),
}

/// One function (or macro) expressions can call.
#[derive(Clone, Copy, Debug)]
pub struct Function {
    pub name: &'static str,
    pub call: Call,
    /// The parameter lists it accepts, receiver excluded: `""` for none, `"start, end"`.
    pub params: &'static [&'static str],
    /// Expanded by the parser into other expressions rather than called.
    pub is_macro: bool,
    pub group: Group,
    pub description: &'static str,
    pub example: &'static str,
    pub expected: Expected,
}

impl Function {
    /// The argument counts it accepts, receiver excluded.
    pub fn arg_counts(&self) -> impl Iterator<Item = usize> + '_ {
        self.params.iter().map(|p| param_count(p))
    }

    /// Each accepted call written out, e.g. `string.substring(start, end)`.
    pub fn signatures(&self) -> impl Iterator<Item = String> + '_ {
        self.params.iter().map(|params| match self.call {
            Call::Global => format!("{}({params})", self.name),
            Call::Member(on) => format!("{on}.{}({params})", self.name),
        })
    }
}

fn param_count(params: &str) -> usize {
    if params.trim().is_empty() {
        0
    } else {
        params.split(',').count()
    }
}

/// The entries named `name` called on a value (`member`) or on their own.
fn entries(name: &str, member: bool) -> impl Iterator<Item = &'static Function> + '_ {
    FUNCTIONS
        .iter()
        .filter(move |f| f.name == name && matches!(f.call, Call::Member(_)) == member)
}

/// The parser of the worker's environment: the standard macros, optional syntax.
static ENV: LazyLock<::cel::Env> = LazyLock::new(::cel::Env::stdlib);

/// Parses `expression` and refuses any call of a function [`FUNCTIONS`] lacks, in the style
/// it is called (`f(x)` or `x.f()`), or with an argument count it does not take.
pub fn check(expression: &str) -> Result<(), String> {
    let program = ENV.compile(expression).map_err(|e| e.to_string())?;
    check_expr(program.expression())
}

fn check_expr(expr: &IdedExpr) -> Result<(), String> {
    match &expr.expr {
        Expr::Call(call) => {
            if !is_operator(&call.func_name) {
                check_call(&call.func_name, call.target.as_deref(), &call.args)?;
            }
            if let Some(target) = &call.target {
                check_expr(target)?;
            }
            call.args.iter().try_for_each(check_expr)
        }
        Expr::Comprehension(c) => [
            &c.iter_range,
            &c.accu_init,
            &c.loop_cond,
            &c.loop_step,
            &c.result,
        ]
        .into_iter()
        .try_for_each(check_expr),
        Expr::List(list) => list.elements.iter().try_for_each(check_expr),
        Expr::Map(map) => map.entries.iter().try_for_each(|entry| match &entry.expr {
            EntryExpr::MapEntry(e) => check_expr(&e.key).and_then(|()| check_expr(&e.value)),
            EntryExpr::StructField(field) => check_expr(&field.value),
        }),
        Expr::Struct(s) => s.entries.iter().try_for_each(|entry| match &entry.expr {
            EntryExpr::MapEntry(e) => check_expr(&e.key).and_then(|()| check_expr(&e.value)),
            EntryExpr::StructField(field) => check_expr(&field.value),
        }),
        Expr::Select(select) => check_expr(&select.operand),
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => Ok(()),
    }
}

/// Operators (`_+_`, `!_`, `-_`, `_[_]`, `_?_:_`, ...) and internal calls (`@in`,
/// `@not_strictly_false`) are written as calls in the AST; they are not functions. (The
/// list is exact: `_f(x)` is a call of a function named `_f`.)
fn is_operator(name: &str) -> bool {
    use ::cel::common::ast::operators::*;
    [
        CONDITIONAL,
        LOGICAL_AND,
        LOGICAL_OR,
        LOGICAL_NOT,
        SUBSTRACT,
        ADD,
        MULTIPLY,
        DIVIDE,
        MODULO,
        EQUALS,
        NOT_EQUALS,
        GREATER_EQUALS,
        LESS_EQUALS,
        GREATER,
        LESS,
        NEGATE,
        INDEX,
        OPT_INDEX,
        OPT_SELECT,
        NOT_STRICTLY_FALSE,
        IN,
    ]
    .contains(&name)
}

fn check_call(name: &str, target: Option<&IdedExpr>, args: &[IdedExpr]) -> Result<(), String> {
    let argc = args.len();
    // `strings.quote(x)` parses as a call of `quote` on `strings`: as in the evaluator, a
    // target spelling a name that, with the function's, names a global function is a
    // call of that function.
    if let Some(target) = target
        && let Some(qualified) = qualified_name(target).map(|ns| format!("{ns}.{name}"))
        && entries(&qualified, false).next().is_some()
    {
        return check_arity(&qualified, false, argc);
    }
    let member = target.is_some();
    if entries(name, member).next().is_some() {
        return check_arity(name, member, argc);
    }
    Err(unknown(name, target, args))
}

fn check_arity(name: &str, member: bool, argc: usize) -> Result<(), String> {
    let mut lists: Vec<&str> = entries(name, member)
        .flat_map(|f| f.params.iter().copied())
        .collect();
    lists.sort_by_key(|p| param_count(p));
    lists.dedup_by_key(|p| param_count(p));
    if lists.iter().any(|p| param_count(p) == argc) {
        return Ok(());
    }
    let counts: Vec<String> = lists.iter().map(|p| param_count(p).to_string()).collect();
    let takes = match (counts.as_slice(), lists.as_slice()) {
        ([n], _) if n == "0" => "no arguments".to_owned(),
        ([n], [params]) => format!(
            "{n} argument{} ({params})",
            if *n == "1" { "" } else { "s" }
        ),
        _ => format!(
            "{} arguments: {}",
            join_or(&counts),
            join_or(&lists.iter().map(|p| format!("({p})")).collect::<Vec<_>>())
        ),
    };
    Err(format!("`{name}` takes {takes}, got {argc}"))
}

fn join_or(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// The message for a call [`FUNCTIONS`] lacks, with a hint: the other call style when the
/// name exists in it, else a close name.
fn unknown(name: &str, target: Option<&IdedExpr>, args: &[IdedExpr]) -> String {
    let args_text: Option<Vec<String>> = args.iter().map(render).collect();
    match target {
        // `lowerAscii(event.email)`: did you mean `event.email.lowerAscii()`?
        None if entries(name, true).next().is_some() => {
            let suggestion = args_text.and_then(|args| {
                let (receiver, rest) = args.split_first()?;
                Some(format!("{receiver}.{name}({})", rest.join(", ")))
            });
            match suggestion {
                Some(s) => format!(
                    "unknown function `{name}`: it is called on a value: did you mean `{s}`?"
                ),
                None => format!(
                    "unknown function `{name}`: it is called on a value, as in `{}`",
                    example(name, true)
                ),
            }
        }
        // `event.password.bcrypt(10)`: did you mean `bcrypt(event.password, 10)`?
        Some(target) if entries(name, false).next().is_some() => {
            let suggestion = render(target).zip(args_text).map(|(receiver, args)| {
                let mut all = vec![receiver];
                all.extend(args);
                format!("{name}({})", all.join(", "))
            });
            match suggestion {
                Some(s) => format!(
                    "unknown function `.{name}()`: `{name}` is not called on a value: did you \
                     mean `{s}`?"
                ),
                None => format!(
                    "unknown function `.{name}()`: `{name}` is not called on a value, as in `{}`",
                    example(name, false)
                ),
            }
        }
        _ => {
            let written = if target.is_some() {
                format!(".{name}()")
            } else {
                name.to_owned()
            };
            match closest(name) {
                Some(close) => format!("unknown function `{written}`: did you mean `{close}`?"),
                None => format!(
                    "unknown function `{written}`; docs/functions.md lists the functions \
                     expressions can call"
                ),
            }
        }
    }
}

fn example(name: &str, member: bool) -> &'static str {
    entries(name, member).next().map_or("", |f| f.example)
}

/// The closest name in [`FUNCTIONS`], when it is close enough to be a likely typo.
fn closest(name: &str) -> Option<&'static str> {
    let lower = name.to_ascii_lowercase();
    FUNCTIONS
        .iter()
        .map(|f| (edit_distance(&lower, &f.name.to_ascii_lowercase()), f.name))
        .filter(|(d, candidate)| *d <= (candidate.len() / 3).clamp(1, 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, candidate)| candidate)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(above + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

/// `a.b.c` for an identifier or field selections on one.
fn qualified_name(expr: &IdedExpr) -> Option<String> {
    match &expr.expr {
        Expr::Ident(name) => Some(name.clone()),
        Expr::Select(select) if !select.test => Some(format!(
            "{}.{}",
            qualified_name(&select.operand)?,
            select.field
        )),
        _ => None,
    }
}

/// Simple expressions written back as source, for hints; `None` for anything else.
fn render(expr: &IdedExpr) -> Option<String> {
    match &expr.expr {
        Expr::Ident(_) | Expr::Select(_) => qualified_name(expr),
        Expr::Literal(LiteralValue::Int(i)) => Some(i.inner().to_string()),
        Expr::Literal(LiteralValue::Boolean(b)) => Some(b.inner().to_string()),
        Expr::Literal(LiteralValue::Null) => Some("null".to_owned()),
        Expr::Literal(LiteralValue::String(s)) => Some(format!(
            "'{}'",
            s.inner().replace('\\', "\\\\").replace('\'', "\\'")
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(expression: &str) -> String {
        match check(expression) {
            Ok(()) => panic!("{expression:?} was accepted"),
            Err(e) => e,
        }
    }

    #[test]
    fn every_example_passes_the_check() {
        for f in FUNCTIONS {
            assert_eq!(check(f.example), Ok(()), "{}: {}", f.name, f.example);
            if let Expected::Value(expected) = f.expected {
                assert_eq!(check(expected), Ok(()), "{}: {expected}", f.name);
            }
        }
    }

    #[test]
    fn every_example_calls_its_function_in_its_style() {
        for f in FUNCTIONS {
            let call = match f.call {
                Call::Global => format!("{}(", f.name),
                Call::Member(_) => format!(".{}(", f.name),
            };
            assert!(f.example.contains(&call), "{}: {}", f.name, f.example);
        }
    }

    #[test]
    fn an_unknown_function_is_refused_by_name() {
        let e = refused("nosuch(1)");
        assert!(e.contains("unknown function `nosuch`"), "{e}");
        let e = refused("event.email.nosuch()");
        assert!(e.contains("unknown function `.nosuch()`"), "{e}");
        let e = refused("event.items.exists(x, nosuch(x))");
        assert!(e.contains("`nosuch`"), "{e}");
        let e = refused("{'a': [lower(event.name)]}");
        assert!(e.contains("`lower`"), "{e}");
        let e = refused("_add_(1, 2)");
        assert!(e.contains("unknown function `_add_`"), "{e}");
    }

    #[test]
    fn a_typo_gets_the_close_name() {
        let e = refused("sha265(event.id)");
        assert!(e.contains("did you mean `sha256`?"), "{e}");
        let e = refused("event.email.lowerascii()");
        assert!(e.contains("did you mean `lowerAscii`?"), "{e}");
    }

    #[test]
    fn a_wrong_argument_count_is_refused_with_the_parameters() {
        assert_eq!(
            check("bcrypt(event.password)"),
            Err("`bcrypt` takes 2 arguments (value, cost), got 1".to_owned())
        );
        assert_eq!(
            check("'abc'.trim(1)"),
            Err("`trim` takes no arguments, got 1".to_owned())
        );
        assert_eq!(
            check("'abc'.substring()"),
            Err("`substring` takes 1 or 2 arguments: (start) or (start, end), got 0".to_owned())
        );
        assert_eq!(
            check("uuid(1)"),
            Err("`uuid` takes no arguments, got 1".to_owned())
        );
        let e = refused("strings.quote()");
        assert!(
            e.starts_with("`strings.quote` takes 1 argument (value)"),
            "{e}"
        );
    }

    #[test]
    fn a_member_function_called_globally_gets_the_member_form() {
        assert_eq!(
            check("lowerAscii(event.email)"),
            Err(
                "unknown function `lowerAscii`: it is called on a value: did you mean \
                 `event.email.lowerAscii()`?"
                    .to_owned()
            )
        );
        let e = refused("replace(event.name, '-', '_')");
        assert!(e.contains("`event.name.replace('-', '_')`"), "{e}");
        let e = refused("lowerAscii(event.a + event.b)");
        assert!(
            e.contains("as in `'Ada@Example.COM'.lowerAscii()`"),
            "no rendering of an operator: the example instead: {e}"
        );
    }

    #[test]
    fn a_global_function_called_on_a_value_gets_the_global_form() {
        let e = refused("event.password.bcrypt(10)");
        assert!(
            e.contains("did you mean `bcrypt(event.password, 10)`?"),
            "{e}"
        );
        let e = refused("'x'.sha256()");
        assert!(e.contains("did you mean `sha256('x')`?"), "{e}");
    }

    #[test]
    fn macros_operators_and_qualified_functions_pass() {
        for ok in [
            "has(event.email) && event.email != ''",
            "[1, 2].exists(x, x > 1)",
            "[1, 2].all(x, x in [1, 2, 3])",
            "event.items.map(i, i.price * i.quantity)",
            "event.items.filter(i, !i.deleted).size() > 0",
            "-event.amount < 0 ? 'a' : 'b'",
            "!(event.a % 2 == 0) || event.b / 2 >= 1 || event.c * 2 <= 3",
            "event.tags[0] == headers['source'] && key in event.ids",
            "strings.quote(event.name)",
            "optional.of(1).orValue(2) == 1 && event.?email.orValue('') == ''",
            "{'k': event.id, 'n': [uuid()]}",
            "timestamp(timestamp / 1000).format('%Y') == '2024'",
            "bcrypt(event.password, 10)",
            "event.email.lowerAscii()",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn a_macro_with_the_wrong_argument_count_is_refused() {
        let e = refused("[1].exists(x)");
        assert!(
            e.starts_with("`exists` takes 2 arguments (variable, condition), got 1"),
            "{e}"
        );
    }

    #[test]
    fn a_syntax_error_is_refused() {
        assert!(check("event.").is_err());
    }
}
