//! The query grammar of the randomized merge test: columns of every
//! type, select lists, WHERE/GROUP BY/HAVING/ORDER BY/LIMIT, and the
//! constructs the merger must refuse.

use super::*;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Ty {
    /// int8 shard key `id`
    Key,
    Int,
    Text,
    /// numeric(10,2)
    Num,
    /// numeric without typmod (NaN, mixed scales)
    NumFree,
    Float,
    Bool,
    TsTz,
    Date,
    Uuid,
    Bytea,
}

/// (name, type) of the columns of `items` (merge_data::WIDE_SCHEMA).
pub(super) const COLUMNS: &[(&str, Ty)] = &[
    ("id", Ty::Key),
    ("grp", Ty::Int),
    ("cat", Ty::Text),
    ("price", Ty::Num),
    ("qty", Ty::Int),
    ("f", Ty::Float),
    ("flag", Ty::Bool),
    ("ts", Ty::TsTz),
    ("d", Ty::Date),
    ("u", Ty::Uuid),
    ("b", Ty::Bytea),
    ("n", Ty::NumFree),
];

/// How an output column is normalized before comparing: values PostgreSQL
/// treats as equal may print differently, and which one a group, DISTINCT
/// or min/max keeps is not determined (-0/0 in float8, 1.5/1.50 in numeric).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Norm {
    None,
    Num,
    Float,
}

pub(super) fn norm_of(ty: Ty) -> Norm {
    match ty {
        Ty::NumFree => Norm::Num,
        Ty::Float => Norm::Float,
        _ => Norm::None,
    }
}

/// One select-list item.
#[derive(Clone, Debug)]
pub(super) struct Item {
    pub(super) expr: String,
    pub(super) alias: Option<String>,
    pub(super) norm: Norm,
    /// A bare column (its name is the output name).
    pub(super) bare: bool,
}

/// How the two answers are compared.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Order {
    /// Rows equal as multisets.
    Unordered,
    /// Multisets equal and the sequence of these output columns (the sort
    /// keys) equal.
    Keys(Vec<usize>),
    /// Rows equal in order.
    Total,
    /// LIMIT without ORDER BY: only the number of rows is determined.
    CountOnly,
}

pub(super) struct Query {
    pub(super) sql: String,
    pub(super) order: Order,
    pub(super) norms: Vec<Norm>,
    /// A construct the merger must refuse with 0A000.
    pub(super) must_refuse: bool,
    /// Every output value has one spelling (else the binary comparison,
    /// which cannot normalise, is skipped).
    pub(super) one_spelling: bool,
}

pub(super) struct Gen {
    pub(super) rng: StdRng,
    pub(super) aliases: usize,
    /// Also literals in forms the merger misreads in HAVING (see
    /// `merge_known_bugs.rs`): uuid without dashes / in upper case, bool as
    /// a string.
    pub(super) tricky: bool,
}

pub(super) const DIRS: &[&str] = &[
    "",
    "",
    " ASC",
    " DESC",
    " DESC",
    " NULLS FIRST",
    " ASC NULLS LAST",
    " DESC NULLS LAST",
    " DESC NULLS FIRST",
];

impl Gen {
    pub(super) fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.rng.random_range(0..v.len())]
    }

    pub(super) fn chance(&mut self, p: f64) -> bool {
        self.rng.random_bool(p)
    }

    pub(super) fn alias(&mut self) -> String {
        self.aliases += 1;
        format!("a{}", self.aliases)
    }

    /// A literal of the column's (or aggregate's) type, in a useful range.
    pub(super) fn literal(&mut self, ty: Ty, magnitude: i64) -> String {
        let m = magnitude.max(1);
        match ty {
            Ty::Key | Ty::Int => self.rng.random_range(-m / 10..=m).to_string(),
            Ty::Num | Ty::NumFree => {
                if ty == Ty::NumFree && self.chance(0.05) {
                    return "'NaN'".into();
                }
                format!(
                    "{}.{:02}",
                    self.rng.random_range(-m / 10..=m),
                    self.rng.random_range(0..100)
                )
            }
            Ty::Float => match self.rng.random_range(0..12) {
                0 => "'NaN'".into(),
                1 => "'Infinity'".into(),
                2 => "'-Infinity'".into(),
                _ => format!("{}", self.rng.random_range(-2 * m..=2 * m) as f64 * 0.5),
            },
            Ty::Text => format!(
                "'{}'",
                self.pick(&["apple", "Banana", "cherry", "c", "date", "éclair", "fig", "Z", "e"])
            ),
            Ty::Bool if self.tricky && self.chance(0.3) => {
                self.pick(&["'true'", "'f'", "'yes'", "'0'"]).to_string()
            }
            Ty::Bool => self.pick(&["true", "false"]).to_string(),
            Ty::TsTz => format!(
                "'2024-{:02}-{:02} {:02}:00:00+0{}'",
                self.rng.random_range(1..13),
                self.rng.random_range(1..28),
                self.rng.random_range(0..24),
                self.rng.random_range(0..3)
            ),
            Ty::Date => format!(
                "'20{:02}-{:02}-{:02}'",
                self.rng.random_range(10..30),
                self.rng.random_range(1..13),
                self.rng.random_range(1..28)
            ),
            Ty::Uuid => {
                let h = format!("{:032x}", self.rng.random::<u128>());
                if self.tricky && self.chance(0.5) {
                    format!("'{}'", h.to_uppercase())
                } else {
                    format!(
                        "'{}-{}-{}-{}-{}'",
                        &h[..8],
                        &h[8..12],
                        &h[12..16],
                        &h[16..20],
                        &h[20..]
                    )
                }
            }
            Ty::Bytea if self.tricky && self.chance(0.3) => {
                self.pick(&["'abc'", "'A'", "''"]).to_string()
            }
            Ty::Bytea => format!(
                "'\\x{}'",
                self.pick(&["", "00", "01", "7f", "80", "ff", "7fff"])
            ),
        }
    }

    pub(super) fn magnitude(ty: Ty, col: &str) -> i64 {
        match (ty, col) {
            (_, "grp") => 8,
            (_, "qty") => 20,
            (_, "price") => 500,
            (_, "f") => 20,
            (_, "n") => 10,
            (_, "id") => ROWS as i64,
            _ => 10,
        }
    }

    /// One WHERE condition on a non-key column.
    pub(super) fn condition(&mut self) -> String {
        let (c, ty) = *self.pick(&COLUMNS[1..]);
        let m = Self::magnitude(ty, c);
        let op = *self.pick(&["=", "<>", "<", "<=", ">", ">="]);
        match self.rng.random_range(0..10) {
            0 => format!("{c} IS NULL"),
            1 => format!("{c} IS NOT NULL"),
            2 if ty != Ty::Bool => {
                let (a, b) = (self.literal(ty, m), self.literal(ty, m));
                format!("{c} BETWEEN {a} AND {b}")
            }
            3 if ty != Ty::Bool => {
                let v: Vec<String> = (0..3).map(|_| self.literal(ty, m)).collect();
                format!("{c} IN ({})", v.join(", "))
            }
            4 if ty == Ty::Text => format!("{c} LIKE '{}%'", self.pick(&["a", "B", "c", "é"])),
            4 if ty == Ty::Bytea => format!("length({c}) = {}", self.rng.random_range(0..3)),
            _ if ty == Ty::Bool => self
                .pick(&["flag", "NOT flag", "flag IS NOT TRUE", "flag = false"])
                .to_string(),
            _ => format!("{c} {op} {}", self.literal(ty, m)),
        }
    }

    pub(super) fn where_clause(&mut self) -> String {
        if !self.chance(0.5) {
            return String::new();
        }
        let mut w = self.condition();
        for _ in 0..self.rng.random_range(0..3) {
            let c = self.condition();
            let op = if self.chance(0.6) { "AND" } else { "OR" };
            w = format!("({w}) {op} ({c})");
        }
        if self.chance(0.1) {
            w = format!("NOT ({w})");
        }
        format!(" WHERE {w}")
    }

    /// A reference to output item `i` in ORDER BY: position, alias or the
    /// expression itself.
    pub(super) fn out_ref(&mut self, items: &[Item], i: usize) -> String {
        let it = &items[i];
        match self.rng.random_range(0..3) {
            0 => (i + 1).to_string(),
            1 if it.alias.is_some() => it.alias.clone().unwrap_or_default(),
            _ => it.expr.clone(),
        }
    }

    pub(super) fn limit_offset(&mut self) -> String {
        let mut s = String::new();
        if self.chance(0.8) {
            s.push_str(&format!(
                " LIMIT {}",
                self.pick(&[0, 1, 2, 3, 7, 10, 25, 100, 5000])
            ));
        }
        if s.is_empty() || self.chance(0.4) {
            s.push_str(&format!(
                " OFFSET {}",
                self.pick(&[0, 1, 5, 17, 50, 1500, 1999, 2500])
            ));
        }
        s
    }

    pub(super) fn select_list(items: &[Item]) -> String {
        items
            .iter()
            .map(|i| match &i.alias {
                Some(a) => format!("{} AS {a}", i.expr),
                None => i.expr.clone(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub(super) fn query(&mut self) -> Query {
        self.aliases = 0;
        match self.rng.random_range(0..100) {
            0..=4 => self.refused(),
            5..=39 => self.plain(),
            40..=44 => self.distinct_on(),
            _ => self.aggregated(),
        }
    }

    /// DISTINCT ON a column with a total order (the unique `id` last), so
    /// that the row PostgreSQL keeps of each group is determined.
    pub(super) fn distinct_on(&mut self) -> Query {
        let (c, ty) = *self.pick(&COLUMNS[1..]);
        let dir = *self.pick(&["", " DESC", " ASC"]);
        let nulls = *self.pick(&["", " NULLS FIRST", " NULLS LAST"]);
        let id_dir = *self.pick(&["", " DESC"]);
        let wh = self.where_clause();
        let mut sql = format!(
            "SELECT DISTINCT ON ({c}) {c}, id, qty FROM items{wh} ORDER BY {c}{dir}{nulls}, id{id_dir}"
        );
        if self.chance(0.3) {
            sql.push_str(&format!(" LIMIT {}", self.rng.random_range(0..8)));
        }
        if self.chance(0.2) {
            sql.push_str(&format!(" OFFSET {}", self.rng.random_range(0..4)));
        }
        Query {
            sql,
            order: Order::Total,
            norms: vec![norm_of(ty), Norm::None, Norm::None],
            must_refuse: false,
            one_spelling: true,
        }
    }

    /// Without aggregation: a k-way merge (or DISTINCT collected).
    pub(super) fn plain(&mut self) -> Query {
        let distinct = self.chance(0.15);
        let star = !distinct && self.chance(0.05);
        let mut items: Vec<Item> = Vec::new();
        if star {
            items = COLUMNS
                .iter()
                .map(|&(c, ty)| Item {
                    expr: c.into(),
                    alias: None,
                    norm: norm_of(ty),
                    bare: true,
                })
                .collect();
        } else {
            for _ in 0..self.rng.random_range(1..=4) {
                if self.chance(0.85) {
                    let (c, ty) = *self.pick(COLUMNS);
                    if items.iter().any(|i| i.expr == c) {
                        continue;
                    }
                    let alias = self.chance(0.2).then(|| self.alias());
                    items.push(Item {
                        expr: c.into(),
                        alias,
                        norm: norm_of(ty),
                        bare: true,
                    });
                } else {
                    let (e, norm) = *self.pick(&[
                        ("qty * 2", Norm::None),
                        ("price - 1", Norm::None),
                        ("-grp", Norm::None),
                        ("lower(cat)", Norm::None),
                        ("f / 2", Norm::Float),
                        ("d + 1", Norm::None),
                        ("n * 2", Norm::Num),
                        ("length(b)", Norm::None),
                        ("id % 7", Norm::None),
                        ("cat || 'x'", Norm::None),
                    ]);
                    let alias = self.chance(0.6).then(|| self.alias());
                    items.push(Item {
                        expr: e.into(),
                        alias,
                        norm,
                        bare: false,
                    });
                }
            }
        }
        let sel = if star {
            "*".to_string()
        } else {
            Self::select_list(&items)
        };
        let wh = self.where_clause();
        // ORDER BY keys: (text, output position if it is an output item)
        let mut keys: Vec<(String, Option<usize>)> = Vec::new();
        let nkeys = *self.pick(&[0, 1, 1, 2, 2, 3]);
        for _ in 0..nkeys {
            if star || distinct || self.chance(0.6) {
                let i = self.rng.random_range(0..items.len());
                if keys.iter().any(|k| k.1 == Some(i)) {
                    continue;
                }
                let r = if star {
                    items[i].expr.clone()
                } else {
                    self.out_ref(&items, i)
                };
                keys.push((r, Some(i)));
            } else {
                let (c, _) = *self.pick(COLUMNS);
                let out = items.iter().position(|i| i.bare && i.expr == c);
                if keys
                    .iter()
                    .any(|k| k.0 == c || (out.is_some() && k.1 == out))
                {
                    continue;
                }
                keys.push((c.into(), out));
            }
        }
        let lim = if self.chance(0.35) {
            self.limit_offset()
        } else {
            String::new()
        };
        let id_out = items.iter().position(|i| i.bare && i.expr == "id");
        let has_id = |keys: &[(String, Option<usize>)]| {
            keys.iter()
                .any(|k| k.0 == "id" || (id_out.is_some() && k.1 == id_out))
        };
        if !lim.is_empty() && (!keys.is_empty() || self.chance(0.7)) {
            // a total order, so that LIMIT/OFFSET pick the same rows
            if distinct {
                for i in 0..items.len() {
                    if !keys.iter().any(|k| k.1 == Some(i)) {
                        keys.push(((i + 1).to_string(), Some(i)));
                    }
                }
            } else if !has_id(&keys) {
                keys.push(("id".into(), id_out));
            }
        }
        let mut sql = format!(
            "SELECT {}{sel} FROM items{wh}",
            if distinct { "DISTINCT " } else { "" }
        );
        if !keys.is_empty() {
            let ks: Vec<String> = keys
                .iter()
                .map(|(k, _)| format!("{k}{}", self.pick(DIRS)))
                .collect();
            sql.push_str(&format!(" ORDER BY {}", ks.join(", ")));
        }
        sql.push_str(&lim);
        let all_out = (0..items.len()).all(|i| keys.iter().any(|k| k.1 == Some(i)));
        let order = if keys.is_empty() {
            if lim.is_empty() {
                Order::Unordered
            } else {
                Order::CountOnly
            }
        } else if has_id(&keys) || (distinct && all_out) {
            Order::Total
        } else if keys.iter().all(|k| k.1.is_some()) {
            Order::Keys(keys.iter().filter_map(|k| k.1).collect())
        } else {
            Order::Unordered
        };
        Query {
            sql,
            order,
            norms: items.iter().map(|i| i.norm).collect(),
            must_refuse: false,
            one_spelling: true,
        }
    }

    /// An aggregate item: (expression, result type for literals, magnitude,
    /// normalization).
    pub(super) fn aggregate(&mut self) -> (String, Ty, i64, Norm) {
        let sumable = [
            ("grp", Ty::Int),
            ("qty", Ty::Int),
            ("price", Ty::Num),
            ("f", Ty::Float),
            ("id", Ty::Key),
            ("n", Ty::NumFree),
        ];
        let ordered = [
            ("grp", Ty::Int),
            ("qty", Ty::Int),
            ("price", Ty::Num),
            ("f", Ty::Float),
            ("id", Ty::Key),
            ("n", Ty::NumFree),
            ("cat", Ty::Text),
            ("ts", Ty::TsTz),
            ("d", Ty::Date),
        ];
        let rows = ROWS as i64;
        match self.rng.random_range(0..16) {
            0 | 1 => ("count(*)".into(), Ty::Int, rows / 4, Norm::None),
            2 | 3 => {
                if self.chance(0.3) {
                    // Counted by the node from the shards' distinct values.
                    let (c, _) = *self.pick(&ordered);
                    let filter = if self.chance(0.3) {
                        format!(
                            " FILTER (WHERE {})",
                            self.pick(&["flag", "qty > 5", "cat IS NOT NULL"])
                        )
                    } else {
                        String::new()
                    };
                    return (
                        format!("count(DISTINCT {c}){filter}"),
                        Ty::Int,
                        rows / 4,
                        Norm::None,
                    );
                }
                let (c, _) = *self.pick(COLUMNS);
                (format!("count({c})"), Ty::Int, rows / 4, Norm::None)
            }
            4 | 5 => {
                let (c, ty) = *self.pick(&sumable);
                let m = Self::magnitude(ty, c) * rows / 8;
                let rty = match ty {
                    Ty::Key | Ty::NumFree => Ty::Num,
                    t => t,
                };
                (format!("sum({c})"), rty, m, Norm::None)
            }
            6 | 7 => {
                let (c, ty) = *self.pick(&sumable);
                let rty = if ty == Ty::Float { Ty::Float } else { Ty::Num };
                (format!("avg({c})"), rty, Self::magnitude(ty, c), Norm::None)
            }
            8..=10 => {
                let (c, ty) = *self.pick(&ordered);
                let f = if self.chance(0.5) { "min" } else { "max" };
                let d = if self.chance(0.1) { "DISTINCT " } else { "" };
                (
                    format!("{f}({d}{c})"),
                    ty,
                    Self::magnitude(ty, c),
                    norm_of(ty),
                )
            }
            11 | 12 => {
                let f = *self.pick(&["bool_and", "bool_or", "every"]);
                let arg = *self.pick(&["flag", "flag", "qty > 10", "cat IS NULL"]);
                (format!("{f}({arg})"), Ty::Bool, 1, Norm::None)
            }
            13 => (
                format!(
                    "count(*) FILTER (WHERE {})",
                    self.pick(&["flag", "qty > 5", "cat = 'fig'"])
                ),
                Ty::Int,
                rows / 8,
                Norm::None,
            ),
            14 => {
                let (e, ty, m) = *self.pick(&[
                    ("sum(qty * 2)", Ty::Int, 40 * rows / 8),
                    ("max(price - 1)", Ty::Num, 500),
                    ("min(f * 2)", Ty::Float, 40),
                    ("sum(qty) FILTER (WHERE grp > 0)", Ty::Int, 20 * rows / 8),
                    ("avg(price) FILTER (WHERE flag)", Ty::Num, 500),
                ]);
                let norm = if ty == Ty::Float {
                    Norm::Float
                } else {
                    Norm::None
                };
                (e.into(), ty, m, norm)
            }
            _ => {
                let (c, ty) = *self.pick(&[("f", Ty::Float), ("n", Ty::NumFree)]);
                let f = *self.pick(&["sum", "avg", "min", "max"]);
                let norm = if f == "min" || f == "max" {
                    norm_of(ty)
                } else {
                    Norm::None
                };
                let rty = if ty == Ty::NumFree { Ty::Num } else { ty };
                (format!("{f}({c})"), rty, 10 * rows / 8, norm)
            }
        }
    }

    /// A HAVING condition over the aggregates and group keys.
    pub(super) fn having(&mut self, group: &[(String, Ty)]) -> String {
        let one = |g: &mut Gen| -> String {
            let (e, ty, m) = if !group.is_empty() && g.chance(0.2) {
                let (e, ty) = g.pick(group).clone();
                let m = Self::magnitude(ty, &e);
                (e, ty, m)
            } else {
                let (e, ty, m, _) = g.aggregate();
                (e, ty, m)
            };
            match g.rng.random_range(0..8) {
                0 => format!("{e} IS NULL"),
                1 => format!("{e} IS NOT NULL"),
                2 if ty != Ty::Bool => {
                    let (a, b) = (g.literal(ty, m), g.literal(ty, m));
                    format!("{e} BETWEEN {a} AND {b}")
                }
                _ => {
                    let op = *g.pick(&["=", "<>", "<", "<=", ">", ">="]);
                    let lit = g.literal(ty, m);
                    if g.chance(0.15) {
                        format!("{lit} {op} {e}")
                    } else {
                        format!("{e} {op} {lit}")
                    }
                }
            }
        };
        let mut h = one(self);
        for _ in 0..self.rng.random_range(0..2) {
            let c = one(self);
            let op = if self.chance(0.6) { "AND" } else { "OR" };
            h = format!("({h}) {op} ({c})");
        }
        if self.chance(0.1) {
            h = format!("NOT ({h})");
        }
        h
    }

    /// With aggregates and/or GROUP BY: partial aggregates combined by group.
    pub(super) fn aggregated(&mut self) -> Query {
        let groupable = [
            ("grp", Ty::Int),
            ("cat", Ty::Text),
            ("flag", Ty::Bool),
            ("d", Ty::Date),
            ("qty", Ty::Int),
            ("u", Ty::Uuid),
            ("b", Ty::Bytea),
            ("f", Ty::Float),
            ("price", Ty::Num),
            ("n", Ty::NumFree),
            ("ts", Ty::TsTz),
            ("qty % 3", Ty::Int),
            ("id", Ty::Key),
        ];
        let ng = *self.pick(&[0, 0, 1, 1, 1, 1, 2, 2, 2, 3]);
        let mut group: Vec<(String, Ty)> = Vec::new();
        while group.len() < ng {
            let (c, ty) = *self.pick(&groupable);
            if !group.iter().any(|g| g.0 == c) {
                group.push((c.to_string(), ty));
            }
        }
        let distinct = self.chance(0.1);
        // items: (item, group key index)
        let mut items: Vec<(Item, Option<usize>)> = Vec::new();
        for (gi, (c, ty)) in group.iter().enumerate() {
            if self.chance(0.75) {
                let alias = self.chance(0.3).then(|| self.alias());
                items.push((
                    Item {
                        expr: c.clone(),
                        alias,
                        norm: norm_of(*ty),
                        bare: !c.contains(' '),
                    },
                    Some(gi),
                ));
            }
        }
        let naggs = if items.is_empty() {
            self.rng.random_range(1..=4)
        } else {
            self.rng.random_range(0..=4)
        };
        let mut one_spelling = true;
        for _ in 0..naggs {
            let (e, ty, _, mut norm) = self.aggregate();
            // Under DISTINCT, equal sums of different scales (-5 and -5.0)
            // are one row, printed either way.
            if distinct && matches!(ty, Ty::Num | Ty::NumFree | Ty::Float) {
                norm = if ty == Ty::Float {
                    Norm::Float
                } else {
                    Norm::Num
                };
                one_spelling = false;
            }
            if items.iter().any(|i| i.0.expr == e) {
                continue;
            }
            let alias = self.chance(0.5).then(|| self.alias());
            items.push((
                Item {
                    expr: e,
                    alias,
                    norm,
                    bare: false,
                },
                None,
            ));
        }
        if items.is_empty() {
            items.push((
                Item {
                    expr: "count(*)".into(),
                    alias: None,
                    norm: Norm::None,
                    bare: false,
                },
                None,
            ));
        }
        items.shuffle(&mut self.rng);
        let only: Vec<Item> = items.iter().map(|i| i.0.clone()).collect();
        let wh = self.where_clause();
        let mut sql = format!(
            "SELECT {}{} FROM items{wh}",
            if distinct { "DISTINCT " } else { "" },
            Self::select_list(&only)
        );
        if !group.is_empty() {
            let gs: Vec<&str> = group.iter().map(|g| g.0.as_str()).collect();
            sql.push_str(&format!(" GROUP BY {}", gs.join(", ")));
        }
        if self.chance(0.3) {
            let h = self.having(&group);
            sql.push_str(&format!(" HAVING {h}"));
        }
        // ORDER BY keys: (text, output position, group key index)
        let mut keys: Vec<(String, Option<usize>, Option<usize>)> = Vec::new();
        let nkeys = *self.pick(&[0, 1, 1, 2, 2, 3]);
        for _ in 0..nkeys {
            match self.rng.random_range(0..4) {
                // an output item
                0 | 1 => {
                    let i = self.rng.random_range(0..items.len());
                    if keys.iter().any(|k| k.1 == Some(i)) {
                        continue;
                    }
                    let r = self.out_ref(&only, i);
                    keys.push((r, Some(i), items[i].1));
                }
                // a group key (selected or not)
                2 if !distinct && !group.is_empty() => {
                    let gi = self.rng.random_range(0..group.len());
                    if keys.iter().any(|k| k.2 == Some(gi)) {
                        continue;
                    }
                    let out = items.iter().position(|i| i.1 == Some(gi));
                    keys.push((group[gi].0.clone(), out, Some(gi)));
                }
                // an aggregate, maybe not selected (hidden)
                3 if !distinct => {
                    let (e, _, _, _) = self.aggregate();
                    let out = items.iter().position(|i| i.0.expr == e);
                    if keys
                        .iter()
                        .any(|k| k.0 == e || (out.is_some() && k.1 == out))
                    {
                        continue;
                    }
                    keys.push((e, out, None));
                }
                _ => {}
            }
        }
        let lim = if self.chance(0.3) {
            self.limit_offset()
        } else {
            String::new()
        };
        let covers_groups = |keys: &[(String, Option<usize>, Option<usize>)]| {
            (0..group.len()).all(|g| keys.iter().any(|k| k.2 == Some(g)))
        };
        let covers_out = |keys: &[(String, Option<usize>, Option<usize>)]| {
            (0..items.len()).all(|i| keys.iter().any(|k| k.1 == Some(i)))
        };
        if !lim.is_empty() && !group.is_empty() && (!keys.is_empty() || self.chance(0.7)) {
            if distinct {
                for (i, item) in items.iter().enumerate() {
                    if !keys.iter().any(|k| k.1 == Some(i)) {
                        keys.push(((i + 1).to_string(), Some(i), item.1));
                    }
                }
            } else {
                for (gi, g) in group.iter().enumerate() {
                    if !keys.iter().any(|k| k.2 == Some(gi)) {
                        let out = items.iter().position(|i| i.1 == Some(gi));
                        keys.push((g.0.clone(), out, Some(gi)));
                    }
                }
            }
        }
        if !keys.is_empty() {
            let ks: Vec<String> = keys
                .iter()
                .map(|(k, _, _)| format!("{k}{}", self.pick(DIRS)))
                .collect();
            sql.push_str(&format!(" ORDER BY {}", ks.join(", ")));
        }
        sql.push_str(&lim);
        let order = if group.is_empty() {
            Order::Total
        } else if keys.is_empty() {
            if lim.is_empty() {
                Order::Unordered
            } else {
                Order::CountOnly
            }
        } else if covers_groups(&keys) || (distinct && covers_out(&keys)) {
            Order::Total
        } else if keys.iter().all(|k| k.1.is_some()) {
            Order::Keys(keys.iter().filter_map(|k| k.1).collect())
        } else {
            Order::Unordered
        };
        Query {
            sql,
            order,
            norms: only.iter().map(|i| i.norm).collect(),
            must_refuse: false,
            one_spelling,
        }
    }

    /// A construct the merger cannot combine: must be refused with 0A000.
    pub(super) fn refused(&mut self) -> Query {
        let c = *self.pick(&["qty", "grp", "price", "cat"]);
        let num = *self.pick(&["qty", "grp", "price"]);
        let wh = self.where_clause();
        let sql = match self.rng.random_range(0..12) {
            0 => format!("SELECT sum(DISTINCT {num}) FROM items{wh}"),
            1 => format!(
                "SELECT grp, coalesce(max({c}), '0') FROM items{wh} GROUP BY grp ORDER BY grp"
            ),
            2 => format!("SELECT string_agg(cat, ',' ORDER BY cat) FROM items{wh}"),
            3 => format!("SELECT grp, array_agg(DISTINCT {c}) FROM items{wh} GROUP BY grp"),
            4 => format!("SELECT sum({num}) + 1 FROM items{wh}"),
            5 => format!(
                "SELECT grp, max({num}) - min({num}) FROM items{wh} GROUP BY grp ORDER BY grp"
            ),
            6 => format!("SELECT id, rank() OVER (ORDER BY {c}) FROM items{wh} ORDER BY id"),
            7 => format!(
                "SELECT DISTINCT ON (grp) grp, count(*) FROM items{wh} GROUP BY grp ORDER BY grp"
            ),
            8 => format!("SELECT stddev({num}) FROM items{wh}"),
            9 => {
                format!("SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY {num}) FROM items{wh}")
            }
            10 => format!("SELECT avg(DISTINCT {num}) FROM items{wh}"),
            _ => format!("SELECT grp, count(*) FROM items{wh} GROUP BY ROLLUP (grp)"),
        };
        Query {
            sql,
            order: Order::Unordered,
            norms: Vec::new(),
            must_refuse: true,
            one_spelling: true,
        }
    }
}
