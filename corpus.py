"""
corpus.py: the default pre-training corpus, generated offline and deterministically from a seed.

PLaMo 2 leans on synthetic corpora; ours is the laptop-sized version. A small made-up "world"
of people, towns, companies and products is written up as Japanese and English documents in
seven genres (encyclopedia entries, stories, dialogues, news, Q&A, translation pairs and
arithmetic). Because the world is generated, every fact in the corpus is known, so a later
stage can ask the model about one and check the answer:

    >>> c = generate_corpus(seed=1337, target_bytes=300_000)
    >>> f = c.heldout_facts[0]
    >>> f["ja_prompt"], f["value"], f["en_prompt"], f["value_en"]
    ('佐野智也の生年月日は', '1995年11月9日', "Tomoya Sano's date of birth is", 'November 9, 1995')

Every document records which facts it states (see Fields). The held-out facts are never stated
in .train: each document that states one goes to .val, so a probe on them tells recall from
guessing, and .train_facts (same format, stated in .train) is the control.

    python corpus.py --out data/ [--seed 1337] [--bytes 8000000]

writes train.txt / val.txt (documents separated by two blank lines, the layout read_documents
reads) and heldout_facts.json. read_documents streams your own text instead (data.py).
People's names are common Japanese name parts put together at random; the towns (placed in
real prefectures), companies and products are fictional, and any likeness to a real one is a
coincidence.
"""
import argparse
import json
import math
import os
import random
import time
from dataclasses import dataclass, field


def _words(s):
    """'佐藤:さとう:Sato 林:はやし:Hayashi' -> [('佐藤', 'さとう', 'Sato'), ('林', 'はやし', 'Hayashi')]"""
    return [tuple(w.split(":")) for w in s.split()]


def _entries(s):
    """'りんご|apples; みかん|mandarin oranges' -> [('りんご', 'apples'), ('みかん', 'mandarin oranges')]"""
    return [tuple(e.strip().split("|")) for e in s.split(";") if e.strip()]


# -----------------------------------------------------------------------------------------------
# The parts the world is built from. Hepburn romanization without macrons (Sato, Ota), as
# English-language press usually writes Japanese names.

FAMILY = _words("""
佐藤:さとう:Sato 鈴木:すずき:Suzuki 高橋:たかはし:Takahashi 田中:たなか:Tanaka 伊藤:いとう:Ito
渡辺:わたなべ:Watanabe 山本:やまもと:Yamamoto 中村:なかむら:Nakamura 小林:こばやし:Kobayashi
加藤:かとう:Kato 吉田:よしだ:Yoshida 山田:やまだ:Yamada 佐々木:ささき:Sasaki 山口:やまぐち:Yamaguchi
松本:まつもと:Matsumoto 井上:いのうえ:Inoue 木村:きむら:Kimura 斎藤:さいとう:Saito 清水:しみず:Shimizu
山崎:やまざき:Yamazaki 森:もり:Mori 池田:いけだ:Ikeda 橋本:はしもと:Hashimoto 阿部:あべ:Abe
石川:いしかわ:Ishikawa 山下:やました:Yamashita 中島:なかじま:Nakajima 石井:いしい:Ishii 小川:おがわ:Ogawa
前田:まえだ:Maeda 岡田:おかだ:Okada 長谷川:はせがわ:Hasegawa 藤田:ふじた:Fujita 後藤:ごとう:Goto
近藤:こんどう:Kondo 村上:むらかみ:Murakami 遠藤:えんどう:Endo 青木:あおき:Aoki 坂本:さかもと:Sakamoto
福田:ふくだ:Fukuda 太田:おおた:Ota 西村:にしむら:Nishimura 藤井:ふじい:Fujii 金子:かねこ:Kaneko
岡本:おかもと:Okamoto 藤原:ふじわら:Fujiwara 中野:なかの:Nakano 三浦:みうら:Miura 原田:はらだ:Harada
松田:まつだ:Matsuda 竹内:たけうち:Takeuchi 中川:なかがわ:Nakagawa 小野:おの:Ono 田村:たむら:Tamura
和田:わだ:Wada 森田:もりた:Morita 上田:うえだ:Ueda 柴田:しばた:Shibata 酒井:さかい:Sakai 工藤:くどう:Kudo
横山:よこやま:Yokoyama 宮本:みやもと:Miyamoto 内田:うちだ:Uchida 高木:たかぎ:Takagi 安藤:あんどう:Ando
谷口:たにぐち:Taniguchi 丸山:まるやま:Maruyama 今井:いまい:Imai 藤本:ふじもと:Fujimoto 村田:むらた:Murata
武田:たけだ:Takeda 上野:うえの:Ueno 杉山:すぎやま:Sugiyama 増田:ますだ:Masuda 平野:ひらの:Hirano
久保:くぼ:Kubo 松井:まつい:Matsui 小島:こじま:Kojima 岩崎:いわさき:Iwasaki 桜井:さくらい:Sakurai
野口:のぐち:Noguchi 野村:のむら:Nomura 木下:きのした:Kinoshita 菊地:きくち:Kikuchi 佐野:さの:Sano
杉本:すぎもと:Sugimoto 新井:あらい:Arai""")
GIVEN_M = _words("""
太郎:たろう:Taro 健太:けんた:Kenta 翔太:しょうた:Shota 大輔:だいすけ:Daisuke 拓也:たくや:Takuya
直樹:なおき:Naoki 誠:まこと:Makoto 浩:ひろし:Hiroshi 学:まなぶ:Manabu 剛:つよし:Tsuyoshi 亮:りょう:Ryo
健一:けんいち:Kenichi 隆:たかし:Takashi 修:おさむ:Osamu 悠人:ゆうと:Yuto 蓮:れん:Ren 大樹:だいき:Daiki
和也:かずや:Kazuya 智也:ともや:Tomoya 裕太:ゆうた:Yuta 雄一:ゆういち:Yuichi 達也:たつや:Tatsuya
哲也:てつや:Tetsuya 秀樹:ひでき:Hideki 正人:まさと:Masato 航:わたる:Wataru 翼:つばさ:Tsubasa
俊介:しゅんすけ:Shunsuke 康平:こうへい:Kohei 慎吾:しんご:Shingo 一郎:いちろう:Ichiro 次郎:じろう:Jiro
茂:しげる:Shigeru 清:きよし:Kiyoshi 明:あきら:Akira 昇:のぼる:Noboru 陽介:ようすけ:Yosuke
信也:しんや:Shinya 恭平:きょうへい:Kyohei 光太郎:こうたろう:Kotaro""")
GIVEN_F = _words("""
花子:はなこ:Hanako 美咲:みさき:Misaki 陽菜:ひな:Hina 結衣:ゆい:Yui さくら:さくら:Sakura 愛:あい:Ai
真由美:まゆみ:Mayumi 恵子:けいこ:Keiko 由美:ゆみ:Yumi 裕子:ゆうこ:Yuko 直子:なおこ:Naoko
久美子:くみこ:Kumiko 明美:あけみ:Akemi 美穂:みほ:Miho 香織:かおり:Kaori 彩:あや:Aya 舞:まい:Mai
葵:あおい:Aoi 凛:りん:Rin 千尋:ちひろ:Chihiro 奈々:なな:Nana 智子:ともこ:Tomoko 洋子:ようこ:Yoko
幸子:さちこ:Sachiko 春香:はるか:Haruka 菜々子:ななこ:Nanako 綾乃:あやの:Ayano 美香:みか:Mika
里美:さとみ:Satomi 沙織:さおり:Saori 恵美:えみ:Emi 静香:しずか:Shizuka 瞳:ひとみ:Hitomi
文子:ふみこ:Fumiko 和子:かずこ:Kazuko 桃子:ももこ:Momoko ひかり:ひかり:Hikari 紀子:のりこ:Noriko
優花:ゆうか:Yuka 真理子:まりこ:Mariko""")
# A town name is a head and a tail morpheme, like 青+山 -> 青山 (Aoyama), plus 市/町/村.
TOWN_HEADS = _words("""
青:あお:Ao 赤:あか:Aka 白:しら:Shira 黒:くろ:Kuro 高:たか:Taka 松:まつ:Matsu 桜:さくら:Sakura
梅:うめ:Ume 竹:たけ:Take 石:いし:Ishi 金:かな:Kana 朝:あさ:Asa 北:きた:Kita 南:みなみ:Minami
東:ひがし:Higashi 西:にし:Nishi 若:わか:Waka 大:おお:O 小:こ:Ko 長:なが:Naga 広:ひろ:Hiro 深:ふか:Fuka
清:きよ:Kiyo 岩:いわ:Iwa 鶴:つる:Tsuru 亀:かめ:Kame 藤:ふじ:Fuji 柳:やなぎ:Yanagi 菊:きく:Kiku
星:ほし:Hoshi 月:つき:Tsuki 霧:きり:Kiri 宮:みや:Miya 水:みず:Mizu 緑:みどり:Midori""")
TOWN_TAILS = _words("""
山:やま:yama 川:かわ:kawa 田:だ:da 野:の:no 沢:さわ:sawa 原:はら:hara 島:しま:shima 岡:おか:oka
崎:さき:saki 浜:はま:hama 森:もり:mori 谷:たに:tani 橋:はし:hashi 瀬:せ:se 里:さと:sato 浦:うら:ura
坂:さか:saka 見:み:mi 台:だい:dai 津:つ:tsu""")
TOWN_KINDS = [("村", "むら", "village"), ("町", "まち", "town"), ("市", "し", "city")]
PREFECTURES = _words("""
青森県:Aomori:東北:Tohoku 岩手県:Iwate:東北:Tohoku 宮城県:Miyagi:東北:Tohoku 山形県:Yamagata:東北:Tohoku
群馬県:Gunma:関東:Kanto 栃木県:Tochigi:関東:Kanto 茨城県:Ibaraki:関東:Kanto 千葉県:Chiba:関東:Kanto
新潟県:Niigata:中部:Chubu 長野県:Nagano:中部:Chubu 静岡県:Shizuoka:中部:Chubu 岐阜県:Gifu:中部:Chubu
石川県:Ishikawa:中部:Chubu 京都府:Kyoto:近畿:Kinki 奈良県:Nara:近畿:Kinki 兵庫県:Hyogo:近畿:Kinki
和歌山県:Wakayama:近畿:Kinki 岡山県:Okayama:中国:Chugoku 広島県:Hiroshima:中国:Chugoku
島根県:Shimane:中国:Chugoku 香川県:Kagawa:四国:Shikoku 愛媛県:Ehime:四国:Shikoku 高知県:Kochi:四国:Shikoku
福岡県:Fukuoka:九州:Kyushu 熊本県:Kumamoto:九州:Kyushu 大分県:Oita:九州:Kyushu 鹿児島県:Kagoshima:九州:Kyushu""")
SPECIALTIES = _entries("""
りんご|apples; みかん|mandarin oranges; 緑茶|green tea; 米|rice; 日本酒|sake; 和紙|washi paper; 陶器|pottery;
漆器|lacquerware; そば|soba noodles; 真珠|pearls; 桃|peaches; ぶどう|grapes; 梨|pears; 栗|chestnuts;
海苔|nori seaweed; 牡蠣|oysters; 刃物|kitchen knives; 絹織物|silk fabric; 味噌|miso; 醤油|soy sauce;
いちご|strawberries; 竹細工|bamboo crafts; メロン|melons; しいたけ|shiitake mushrooms; わさび|wasabi;
干し柿|dried persimmons""")
OCCUPATIONS = _entries("""
技術者|an engineer|engineer; 研究者|a researcher|researcher; デザイナー|a designer|designer;
営業担当者|a sales representative|sales representative; 会計士|an accountant|accountant;
プログラマー|a programmer|programmer; 通訳|an interpreter|interpreter; 工場長|a factory manager|factory manager;
広報担当者|a public relations officer|public relations officer;
品質管理担当者|a quality inspector|quality inspector; 化学者|a chemist|chemist;
企画担当者|a product planner|product planner; 秘書|a secretary|secretary; 運転手|a driver|driver""")
HOBBIES = _entries("""
釣り|fishing; 将棋|shogi; 囲碁|go; 登山|mountain climbing; 料理|cooking; 写真|photography; 読書|reading;
ギター|playing the guitar; 茶道|the tea ceremony; 俳句|writing haiku; 書道|calligraphy; 園芸|gardening;
水泳|swimming; サイクリング|cycling; 映画鑑賞|watching films; 天体観測|stargazing; ピアノ|playing the piano;
陶芸|making pottery""")
# industry: (name part ja, en, what the company is ja, en, products "kind ja|en|en plural|min price|max price;...")
INDUSTRIES = [
    ("電機", "Electric", "家電メーカー", "an electronics maker", "炊飯器|rice cooker|rice cookers|8000|60000;冷蔵庫|refrigerator|refrigerators|50000|300000;掃除機|vacuum cleaner|vacuum cleaners|10000|80000;扇風機|electric fan|electric fans|3000|30000"),
    ("製菓", "Confectionery", "菓子メーカー", "a confectionery maker", "チョコレート|chocolate bar|chocolate bars|100|500;ビスケット|biscuit|biscuits|100|400;キャラメル|caramel|caramels|100|300;せんべい|rice cracker|rice crackers|150|600"),
    ("食品", "Foods", "食品メーカー", "a food company", "カップ麺|cup noodle|cup noodles|100|300;カレールー|curry roux|curry roux|150|500;缶詰|canned soup|canned soups|100|400"),
    ("工業", "Industries", "機械メーカー", "a machinery maker", "自転車|bicycle|bicycles|15000|120000;ミシン|sewing machine|sewing machines|20000|150000;トラクター|tractor|tractors|1000000|5000000"),
    ("化学", "Chemical", "化学メーカー", "a chemical company", "塗料|paint|paints|500|5000;接着剤|adhesive|adhesives|200|2000;洗剤|detergent|detergents|200|800"),
    ("精機", "Precision", "精密機器メーカー", "a precision instrument maker", "腕時計|wristwatch|wristwatches|5000|300000;カメラ|camera|cameras|20000|400000;顕微鏡|microscope|microscopes|30000|500000"),
    ("製薬", "Pharmaceutical", "製薬会社", "a pharmaceutical company", "風邪薬|cold medicine|cold medicines|800|2500;目薬|eye drop|eye drops|400|1500;胃腸薬|stomach medicine|stomach medicines|600|2000"),
    ("酒造", "Brewery", "酒造会社", "a brewery", "日本酒|sake|sakes|1000|10000;焼酎|shochu|shochu|1000|5000;梅酒|plum wine|plum wines|800|4000"),
    ("玩具", "Toys", "おもちゃメーカー", "a toy maker", "人形|doll|dolls|1500|15000;ボードゲーム|board game|board games|2000|6000;積み木|block set|block sets|2000|8000"),
    ("文具", "Stationery", "文具メーカー", "a stationery maker", "鉛筆|pencil|pencils|50|300;万年筆|fountain pen|fountain pens|3000|50000;ノート|notebook|notebooks|100|500"),
]
COMPANY_HEADS = _words("""
若葉:Wakaba 青空:Aozora 北斗:Hokuto 瑞穂:Mizuho 白鳥:Shiratori 紅葉:Momiji 銀河:Ginga 双葉:Futaba
千鳥:Chidori 山彦:Yamabiko 夕凪:Yunagi 朝霧:Asagiri 春風:Harukaze 常盤:Tokiwa 隼:Hayabusa 燕:Tsubame
曙:Akebono 芙蓉:Fuyo 桔梗:Kikyo 若竹:Wakatake 琥珀:Kohaku 翡翠:Hisui 黎明:Reimei 東雲:Shinonome
雲雀:Hibari 鈴蘭:Suzuran 三日月:Mikazuki 七星:Nanahoshi 八雲:Yakumo 大地:Daichi 清流:Seiryu
松風:Matsukaze 萌黄:Moegi 白樺:Shirakaba 浜風:Hamakaze 暁:Akatsuki""")
# Product brands are two or three katakana syllables, like カリナ (Karina).
SYLLABLES = _words("""
カ:ka キ:ki ク:ku コ:ko サ:sa シ:shi ス:su セ:se ソ:so タ:ta チ:chi ツ:tsu テ:te ト:to ナ:na ニ:ni
ノ:no ハ:ha ヒ:hi フ:fu ホ:ho マ:ma ミ:mi ム:mu メ:me モ:mo ヤ:ya ユ:yu ヨ:yo ラ:ra リ:ri ル:ru
レ:re ロ:ro ワ:wa""")
MONTHS = "January February March April May June July August September October November December".split()


# -----------------------------------------------------------------------------------------------
# The world: entities and their facts.

@dataclass
class Entity:
    id: str     # "person:0042"; fact ids are "person:0042/birthplace"
    kind: str   # person | town | company | product
    name: dict  # "ja", "en" and the parts templates need (reading, family_ja, kind_en, ...)
    attrs: dict = field(default_factory=dict)  # attribute -> value; `value()` writes it out


@dataclass
class World:
    people: list
    towns: list
    companies: list
    products: list

    def __post_init__(self):
        self.born_in, self.based_in, self.made_by = {}, {}, {}  # reverse links for lists
        for p in self.people:
            self.born_in.setdefault(p.attrs["birthplace"].id, []).append(p)
        for c in self.companies:
            self.based_in.setdefault(c.attrs["hq"].id, []).append(c)
        for d in self.products:
            self.made_by.setdefault(d.attrs["maker"].id, []).append(d)


def _unique(rng, n, make, taken=()):
    """Call make() until n results with distinct Japanese and English names (and none in taken)."""
    out, seen = [], set(taken)
    while len(out) < n:
        e = make()
        if e["ja"] not in seen and e["en"] not in seen:
            seen.update((e["ja"], e["en"]))
            out.append(e)
    return out


def build_world(seed=1337, n_people=600):
    """Draw a world of n_people people, a fifth as many towns and a sixth as many companies (each
    with a product or two); same seed and size -> same world.

    >>> w = build_world(1337)
    >>> p = w.people[0]
    >>> p.name["ja"], p.name["en"], value(p, "birthplace", "ja"), value(p, "born", "en")
    ('佐野智也', 'Tomoya Sano', '菊野町', 'November 9, 1995')
    """
    if n_people < 30:
        raise ValueError(f"a world needs at least 30 people (got {n_people}).")
    n_towns, n_companies = n_people // 5, n_people // 6
    rng = random.Random(f"world/{seed}")
    # A town must not share a name with a family or a prefecture, or probes become ambiguous.
    taken = {f[2] for f in FAMILY} | {f[0] for f in FAMILY} | {p[1] for p in PREFECTURES}

    def make_town():
        (hk, hr, he), (tk, tr, te) = rng.choice(TOWN_HEADS), rng.choice(TOWN_TAILS)
        population = int(math.exp(rng.uniform(math.log(1500), math.log(900_000))))
        kind = TOWN_KINDS[(population >= 8000) + (population >= 40_000)]
        pj, pe, rj, re_ = rng.choice(PREFECTURES)
        return {"ja": hk + tk, "en": he + te, "reading": hr + tr, "kind": kind, "population": population,
                "pref": {"ja": pj, "en": f"{pe} Prefecture", "region_ja": rj, "region_en": re_},
                "specialty": dict(zip(("ja", "en"), rng.choice(SPECIALTIES)))}

    towns = []
    for i, t in enumerate(_unique(rng, n_towns, make_town, taken)):
        kj, kr, ke = t["kind"]
        names = {"ja": t["ja"] + kj, "en": t["en"], "reading": t["reading"] + kr, "kind_ja": kj, "kind_en": ke}
        facts = {"prefecture": t["pref"], "population": t["population"], "specialty": t["specialty"]}
        towns.append(Entity(f"town:{i:04d}", "town", names, facts))

    def make_person():
        female = rng.random() < 0.5
        fk, fr, fe = rng.choice(FAMILY)
        gk, gr, ge = rng.choice(GIVEN_F if female else GIVEN_M)
        return {"ja": fk + gk, "en": f"{ge} {fe}", "reading": f"{fr} {gr}", "female": female,
                "family_ja": fk, "family_en": fe}

    people = []
    for i, n in enumerate(_unique(rng, n_people, make_person)):
        job, hobby = rng.choice(OCCUPATIONS), rng.choice(HOBBIES)
        people.append(Entity(f"person:{i:04d}", "person", n, {
            "birthplace": rng.choice(towns),
            "born": (rng.randint(1945, 2001), rng.randint(1, 12), rng.randint(1, 28)),
            "job": {"ja": job[0], "en": job[1], "bare": job[2]},
            "hobby": {"ja": hobby[0], "en": hobby[1]}}))

    def make_company():
        (hj, he), ind = rng.choice(COMPANY_HEADS), rng.choice(INDUSTRIES)
        return {"ja": hj + ind[0], "en": f"{he} {ind[1]}", "industry": ind}

    founders = rng.sample([p for p in people if p.attrs["born"][0] <= 1985], n_companies)
    companies, products = [], []
    for i, (c, founder) in enumerate(zip(_unique(rng, n_companies, make_company), founders)):
        ind = c["industry"]
        founded = min(founder.attrs["born"][0] + rng.randint(24, 45), 2022)
        ja_full = rng.choice([f"株式会社{c['ja']}", f"{c['ja']}株式会社"])
        en_full = c["en"] + rng.choice([" Co., Ltd.", " Inc.", " Corporation"])
        hq = founder.attrs["birthplace"] if rng.random() < 0.4 else rng.choice(towns)
        co = Entity(f"company:{i:04d}", "company",
                    {"ja": c["ja"], "en": c["en"], "full_ja": ja_full, "full_en": en_full,
                     "industry_ja": ind[2], "industry_en": ind[3]},
                    {"founded": founded, "hq": hq, "founder": founder,
                     "employees": int(math.exp(rng.uniform(math.log(12), math.log(20_000))))})
        founder.attrs["employer"] = co
        companies.append(co)
        for kind in rng.sample(ind[4].split(";"), rng.choice([1, 1, 2])):
            kj, ke, kp, lo, hi = kind.split("|")
            products.append((co, kj, ke, kp, int(lo), int(hi)))
    for p in people:
        p.attrs.setdefault("employer", rng.choice(companies))
        p.attrs = {k: p.attrs[k] for k in ("birthplace", "born", "employer", "job", "hobby")}

    def make_brand():
        syl = [rng.choice(SYLLABLES) for _ in range(rng.choice([2, 3, 3]))]
        if rng.random() < 0.3:
            syl.append(("ン", "n"))
        return {"ja": "".join(s[0] for s in syl), "en": "".join(s[1] for s in syl).capitalize()}

    brands = _unique(rng, len(products), make_brand)
    for i, ((co, kj, ke, kp, lo, hi), b) in enumerate(zip(products, brands)):
        price = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        price = int(round(price, -2) if price >= 1000 else round(price, -1))
        products[i] = Entity(f"product:{i:04d}", "product",
                             {"ja": b["ja"], "en": b["en"], "kind_ja": kj, "kind_en": ke,
                              "kinds_ja": kj, "kinds_en": kp},
                             {"maker": co, "released": rng.randint(co.attrs["founded"], 2024), "price": price})
    return World(people, towns, companies, products)


def value(e, attr, lang):
    """How every document writes one fact, in one language.

    >>> value(w.people[0], "born", "ja"), value(w.people[0], "born", "en")
    ('1995年11月9日', 'November 9, 1995')
    >>> value(w.towns[0], "population", "ja"), value(w.products[0], "price", "en")
    ('78,330人', '3,500 yen')
    """
    v = e.attrs[attr]
    ja = lang == "ja"
    if isinstance(v, Entity):
        return v.name[lang]
    if attr == "born":
        y, m, d = v
        return f"{y}年{m}月{d}日" if ja else f"{MONTHS[m - 1]} {d}, {y}"
    if attr in ("founded", "released"):
        return f"{v}年" if ja else str(v)
    if attr in ("population", "employees"):
        return f"{v:,}人" if ja else f"{v:,}"
    if attr == "price":
        return f"{v:,}円" if ja else f"{v:,} yen"
    return v[lang]  # job, hobby, specialty, prefecture


# -----------------------------------------------------------------------------------------------
# Templates are plain str.format strings; Fields fills them and remembers which facts it used.

class Fields:
    """The values a template may use, each tagged with the facts it states.

    >>> F = Fields("ja"); F.put("name", "山田太郎"); F.put("town", "青山市", ("person:0001", "birthplace"))
    >>> "{name}の出身地は{town}です。".format_map(F), F.used
    ('山田太郎の出身地は青山市です。', [('person:0001', 'birthplace')])
    """

    def __init__(self, lang):
        self.lang, self.values, self.used = lang, {}, []

    def put(self, key, val, *facts):
        self.values[key] = (val, facts)

    def __getitem__(self, key):
        val, facts = self.values[key]
        self.used.extend(facts)  # format_map asks only for the fields a template uses
        return val

    def fill(self, template):
        return template.format_map(self)


def person_fields(F, w, p, pre=""):
    L, ja = F.lang, F.lang == "ja"
    town, co = p.attrs["birthplace"], p.attrs["employer"]
    prod = w.made_by[co.id][0]
    bp, em, job = (p.id, "birthplace"), (p.id, "employer"), (p.id, "job")
    F.put(pre + "name", p.name[L])
    F.put(pre + "family", p.name["family_" + L])
    F.put(pre + "reading", p.name["reading"])
    female = p.name["female"]
    F.put(pre + "san", p.name["family_ja"] + "さん" if ja else ("Ms. " if female else "Mr. ") + p.name["family_en"])
    for k, (f, m) in {"he": ("she", "he"), "his": ("her", "his"), "him": ("her", "him")}.items():
        F.put(pre + k, f if female else m)
        F.put(pre + k.capitalize(), (f if female else m).capitalize())
    F.put(pre + "town", value(p, "birthplace", L), bp)
    F.put(pre + "town_kind", town.name["kind_" + L], bp)
    F.put(pre + "pref", value(town, "prefecture", L), bp, (town.id, "prefecture"))
    F.put(pre + "t_population", value(town, "population", L), bp, (town.id, "population"))
    F.put(pre + "t_specialty", value(town, "specialty", L), bp, (town.id, "specialty"))
    F.put(pre + "company", value(p, "employer", L), em)
    F.put(pre + "c_founded", value(co, "founded", L), em, (co.id, "founded"))
    F.put(pre + "c_founder", value(co, "founder", L), em, (co.id, "founder"))
    F.put(pre + "c_product", prod.name[L], em, (prod.id, "maker"))
    F.put(pre + "c_kind", prod.name["kind_" + L], em, (prod.id, "maker"))
    F.put(pre + "job", value(p, "job", L), job)
    F.put(pre + "job_bare", p.attrs["job"]["bare"], job)
    y, m, d = p.attrs["born"]
    F.put(pre + "date", value(p, "born", L), (p.id, "born"))
    F.put(pre + "year", f"{y}年" if ja else str(y), (p.id, "born"))
    F.put(pre + "birthday", f"{m}月{d}日" if ja else f"{MONTHS[m - 1]} {d}", (p.id, "born"))
    F.put(pre + "hobby", value(p, "hobby", L), (p.id, "hobby"))
    F.put(pre + "hobby_cap", value(p, "hobby", L).capitalize(), (p.id, "hobby"))


def town_fields(F, w, t, pre=""):
    L, pf = F.lang, (t.id, "prefecture")
    F.put(pre + "name", t.name[L])
    F.put(pre + "reading", t.name["reading"])
    F.put(pre + "kind", t.name["kind_" + L])
    F.put(pre + "pref", value(t, "prefecture", L), pf)
    F.put(pre + "region", t.attrs["prefecture"]["region_" + L], pf)
    F.put(pre + "population", value(t, "population", L), (t.id, "population"))
    F.put(pre + "specialty", value(t, "specialty", L), (t.id, "specialty"))
    bullet = "・" if L == "ja" else "- "
    people, firms = w.born_in.get(t.id, [])[:5], w.based_in.get(t.id, [])[:5]
    F.put(pre + "people", "\n".join(bullet + p.name[L] for p in people), *[(p.id, "birthplace") for p in people])
    F.put(pre + "companies", "\n".join(bullet + c.name[L] for c in firms), *[(c.id, "hq") for c in firms])


def company_fields(F, w, c, pre=""):
    L, hq, founded = F.lang, c.attrs["hq"], (c.id, "founded")
    prods = w.made_by[c.id]
    F.put(pre + "name", c.name[L])
    F.put(pre + "full", c.name["full_" + L])
    F.put(pre + "industry", c.name["industry_" + L])
    F.put(pre + "founded", value(c, "founded", L), founded)
    F.put(pre + "hq", value(c, "hq", L), (c.id, "hq"))
    F.put(pre + "hq_pref", value(hq, "prefecture", L), (c.id, "hq"), (hq.id, "prefecture"))
    F.put(pre + "founder", value(c, "founder", L), (c.id, "founder"))
    F.put(pre + "employees", value(c, "employees", L), (c.id, "employees"))
    F.put(pre + "product", prods[0].name[L], (prods[0].id, "maker"))
    F.put(pre + "kind", prods[0].name["kind_" + L], (prods[0].id, "maker"))
    F.put(pre + "kinds", prods[0].name["kinds_" + L], (prods[0].id, "maker"))
    lines = [f"・{d.name['kind_ja']}「{d.name['ja']}」（{value(d, 'released', 'ja')}発売）" if L == "ja" else
             f"- the {d.name['en']} {d.name['kind_en']} (released {value(d, 'released', 'en')})" for d in prods]
    F.put(pre + "products", "\n".join(lines), *[(d.id, a) for d in prods for a in ("maker", "released")])
    years = [n for n in (10, 20, 25, 30, 40, 50, 60) if c.attrs["founded"] + n <= 2024]
    n = years[int(c.id[-4:]) % len(years)] if years else 0  # not random: fixed per company
    F.put(pre + "n", str(n), founded)
    F.put(pre + "anniv_year", f"{c.attrs['founded'] + n}年" if L == "ja" else str(c.attrs["founded"] + n), founded)


def product_fields(F, w, d, pre=""):
    L, co, mk = F.lang, d.attrs["maker"], (d.id, "maker")
    F.put(pre + "name", d.name[L])
    F.put(pre + "kind", d.name["kind_" + L])
    F.put(pre + "maker", value(d, "maker", L), mk)
    F.put(pre + "m_hq", value(co, "hq", L), mk, (co.id, "hq"))
    F.put(pre + "m_hq_pref", value(co.attrs["hq"], "prefecture", L), mk, (co.id, "hq"))
    F.put(pre + "released", value(d, "released", L), (d.id, "released"))
    F.put(pre + "price", value(d, "price", L), (d.id, "price"))


FIELDS = {"person": person_fields, "town": town_fields, "company": company_fields, "product": product_fields}


# -----------------------------------------------------------------------------------------------
# One sentence per fact, several ways, in both languages (Japanese in the plain である style of
# reference works). ja[i] and en[i] say the same thing, for translation pairs. The first
# sentences begin with the probe prompts (pja / pen), so a probe asks for a fact in words the
# model has read, and no document continues a prompt with anything but its value (the
# questions q* are worded around it); `value` names the field that holds the answer.

ATTRS = {
    "birthplace": dict(kind="person", value="town", pja="{name}の出身地は", pen="{name} was born in",
        qja="{name}はどこの出身ですか。", qen="Where was {name} born?",
        ja=["{name}の出身地は{town}である。", "{name}は{pref}{town}の出身である。", "{name}は{pref}の{town}で生まれた。", "{name}の故郷は{pref}の{town}だ。"],
        en=["{name} was born in {town}, {pref}.", "{name} comes from {town}, {pref}.", "{name} was born in {town}, a {town_kind} in {pref}.", "{name}'s hometown is {town}, {pref}."]),
    "born": dict(kind="person", value="date", pja="{name}の生年月日は", pen="{name}'s date of birth is",
        qja="{name}はいつ生まれましたか。", qen="When was {name} born?",
        ja=["{name}の生年月日は{date}である。", "{name}は{date}に生まれた。", "{name}は{date}生まれである。"],
        en=["{name}'s date of birth is {date}.", "{name} was born on {date}.", "{name}'s birthday is {birthday}, and {he} was born in {year}."]),
    "employer": dict(kind="person", value="company", pja="{name}の勤務先は", pen="{name} works for",
        qja="{name}はどの会社に勤めていますか。", qen="Which company does {name} work for?",
        ja=["{name}の勤務先は{company}である。", "{name}は{company}に勤めている。", "{name}は現在、{company}で働いている。"],
        en=["{name} works for {company}.", "{name} is employed by {company}.", "{name} currently works at {company}."]),
    "job": dict(kind="person", value="job", pja="{name}の職業は", pen="{name} works as",
        qja="{name}はどんな仕事をしていますか。", qen="What does {name} do for a living?",
        ja=["{name}の職業は{job}である。", "{name}は{job}として働いている。", "{name}は{company}の{job}である。"],
        en=["{name} works as {job}.", "By profession, {name} is {job}.", "{name} is {job} at {company}."]),
    "hobby": dict(kind="person", value="hobby", pja="{name}の趣味は", pen="{name}'s hobby is",
        qja="{name}はどんな趣味を持っていますか。", qen="What is {name}'s hobby?",
        ja=["{name}の趣味は{hobby}である。", "{name}は休日によく{hobby}を楽しんでいる。", "{name}は{hobby}が好きだ。"],
        en=["{name}'s hobby is {hobby}.", "In {his} free time, {name} enjoys {hobby}.", "{name} is fond of {hobby}."]),
    "prefecture": dict(kind="town", value="pref", pja="{name}の所在地は", pen="{name} is located in",
        qja="{name}はどの都道府県にありますか。", qen="Which prefecture is {name} in?",
        ja=["{name}の所在地は{pref}である。", "{name}は{pref}にある{kind}だ。", "{name}は{region}地方の{pref}に位置している。"],
        en=["{name} is located in {pref}.", "{name} is a {kind} in {pref}.", "{name} lies in {pref}, in the {region} region."]),
    "population": dict(kind="town", value="population", pja="{name}の人口は", pen="The population of {name} is",
        qja="{name}には何人が住んでいますか。", qen="How many people live in {name}?",
        ja=["{name}の人口は{population}である。", "{name}には{population}が暮らしている。", "{name}は人口{population}の{kind}である。"],
        en=["The population of {name} is {population}.", "About {population} people live in {name}.", "{name} is a {kind} with a population of {population}."]),
    "specialty": dict(kind="town", value="specialty", pja="{name}の名産品は", pen="{name} is known for its",
        qja="{name}は何の産地として知られていますか。", qen="What is {name} known for?",
        ja=["{name}の名産品は{specialty}である。", "{name}は{specialty}の産地として知られている。", "{name}の特産品といえば{specialty}だ。"],
        en=["{name} is known for its {specialty}.", "The specialty of {name} is {specialty}.", "{name} is famous for {specialty}."]),
    "founded": dict(kind="company", value="founded", pja="{name}の創業年は", pen="{name} was founded in",
        qja="{name}はいつ創業されましたか。", qen="When was {name} founded?",
        ja=["{name}の創業年は{founded}である。", "{name}は{founded}に創業された。", "{name}の歴史は{founded}に始まった。"],
        en=["{name} was founded in {founded}.", "{name} has been in business since {founded}.", "The history of {name} began in {founded}."]),
    "hq": dict(kind="company", value="hq", pja="{name}の本社所在地は", pen="{name} is headquartered in",
        qja="{name}の本社はどこにありますか。", qen="Where is {name} headquartered?",
        ja=["{name}の本社所在地は{hq}である。", "{name}は{hq_pref}{hq}に本社を置いている。", "{name}の本社は{hq}にある。"],
        en=["{name} is headquartered in {hq}.", "{name} has its head office in {hq}, {hq_pref}.", "The head office of {name} is in {hq}."]),
    "founder": dict(kind="company", value="founder", pja="{name}の創業者は", pen="{name} was founded by",
        qja="{name}を創業したのは誰ですか。", qen="Who founded {name}?",
        ja=["{name}の創業者は{founder}である。", "{name}は{founder}によって設立された。", "{founder}が{name}を創業した。"],
        en=["{name} was founded by {founder}.", "{founder} founded {name}.", "The founder of {name} is {founder}."]),
    "employees": dict(kind="company", value="employees", pja="{name}の従業員数は", pen="The number of employees at {name} is",
        qja="{name}の従業員は何人ですか。", qen="How many employees does {name} have?",
        ja=["{name}の従業員数は{employees}である。", "{name}では{employees}の社員が働いている。"],
        en=["The number of employees at {name} is {employees}.", "{name} has {employees} employees.", "{name} employs {employees} people."]),
    "maker": dict(kind="product", value="maker", pja="{kind}「{name}」の製造元は", pen="The {name} {kind} is made by",
        qja="{kind}「{name}」を作っている会社はどこですか。", qen="Which company makes the {name} {kind}?",
        ja=["{kind}「{name}」の製造元は{maker}である。", "「{name}」は{maker}が作っている{kind}だ。", "{maker}は{kind}「{name}」を製造している。"],
        en=["The {name} {kind} is made by {maker}.", "{maker} makes the {name} {kind}.", "The {name} is a {kind} produced by {maker}."]),
    "released": dict(kind="product", value="released", pja="{kind}「{name}」の発売年は", pen="The {name} {kind} was released in",
        qja="「{name}」はいつ発売されましたか。", qen="When was the {name} released?",
        ja=["{kind}「{name}」の発売年は{released}である。", "「{name}」は{released}に発売された。", "{kind}「{name}」が店頭に並んだのは{released}のことだ。"],
        en=["The {name} {kind} was released in {released}.", "The {name} first went on sale in {released}.", "{maker} launched the {name} in {released}."]),
    "price": dict(kind="product", value="price", pja="{kind}「{name}」の価格は", pen="The {name} {kind} costs",
        qja="「{name}」の値段はいくらですか。", qen="How much does the {name} cost?",
        ja=["{kind}「{name}」の価格は{price}である。", "「{name}」は{price}で販売されている。", "「{name}」の値段は{price}だ。"],
        en=["The {name} {kind} costs {price}.", "The {name} sells for {price}.", "The price of the {name} is {price}."]),
}
# Facts a probe may hold out: the town's prefecture is left out because nearly every document
# about a person names it, which would send a large share of the corpus to validation.
PROBED = ["birthplace", "born", "employer", "job", "hobby", "population", "specialty",
          "founded", "hq", "founder", "maker", "released", "price"]

# Encyclopedia entries: a lead (or an infobox-like card), then fact sentences in random order.
LEADS = {
    ("person", "ja"): ["{name}（{reading}、{date} - ）は、日本の{job}。{pref}{town}出身。",
                       "{name}（{reading}）は、{company}に勤める{job}である。{date}生まれ。",
                       "{name}は、{pref}{town}出身の{job}。"],
    ("person", "en"): ["{name} (born {date}) is a Japanese {job_bare} from {town}, {pref}.",
                       "{name} is a Japanese {job_bare} who works for {company}.",
                       "{name} is {job} from {pref}."],
    ("town", "ja"): ["{name}（{reading}）は、{pref}にある{kind}。{region}地方に位置する。",
                     "{name}は、{region}地方の{pref}にある{kind}である。人口は{population}。",
                     "{name}（{reading}）は日本の{kind}で、{pref}に属する。{specialty}の産地として知られる。"],
    ("town", "en"): ["{name} is a {kind} in {pref}, Japan.",
                     "{name} is a {kind} in the {region} region of Japan. It has a population of {population}.",
                     "{name} is a Japanese {kind} in {pref}, known for its {specialty}."],
    ("company", "ja"): ["{full}（{name}）は、{hq_pref}{hq}に本社を置く{industry}。",
                        "{name}は、{founded}に{founder}が創業した日本の{industry}である。",
                        "{full}は、日本の{industry}。本社は{hq}にある。従業員数は{employees}。"],
    ("company", "en"): ["{full} is {industry} headquartered in {hq}, {hq_pref}.",
                        "{name} is a Japanese company founded by {founder} in {founded}.",
                        "{full} is {industry} based in {hq}. It has {employees} employees."],
    ("product", "ja"): ["「{name}」は、{maker}が製造・販売している{kind}。",
                        "{kind}「{name}」は、{released}に{maker}から発売された。",
                        "「{name}」は日本の{kind}のブランドである。製造元は{maker}。"],
    ("product", "en"): ["The {name} is a {kind} made and sold by {maker}.",
                        "The {name} {kind} was released by {maker} in {released}.",
                        "The {name} is a Japanese {kind} brand. Its maker is {maker}."],
}
CARDS = {
    ("person", "ja"): "■{name}（{reading}）\n生年月日：{date}\n出身地：{pref}{town}\n職業：{job}\n勤務先：{company}\n趣味：{hobby}",
    ("person", "en"): "Name: {name}\nBorn: {date}\nHometown: {town}, {pref}\nOccupation: {job_bare}\nEmployer: {company}\nHobby: {hobby}",
    ("town", "ja"): "■{name}（{reading}）\n所在地：{pref}\n地方：{region}地方\n人口：{population}\n名産品：{specialty}",
    ("town", "en"): "Name: {name}\nType: {kind}\nPrefecture: {pref}\nRegion: {region}\nPopulation: {population}\nKnown for: {specialty}",
    ("company", "ja"): "■{full}\n本社所在地：{hq_pref}{hq}\n創業：{founded}\n創業者：{founder}\n従業員数：{employees}\n主な製品：{kind}「{product}」",
    ("company", "en"): "Company: {full}\nHeadquarters: {hq}, {hq_pref}\nFounded: {founded}\nFounder: {founder}\nEmployees: {employees}\nMain product: the {product} {kind}",
    ("product", "ja"): "■{kind}「{name}」\n製造元：{maker}\n発売年：{released}\n価格：{price}",
    ("product", "en"): "Product: the {name} {kind}\nMaker: {maker}\nReleased: {released}\nPrice: {price}",
}
LISTS = {  # a closing list, where the entity has one: (field, heading ja, heading en)
    "town": [("people", "出身の人物", "Notable people"), ("companies", "本社を置く企業", "Companies based here")],
    "company": [("products", "主な製品", "Products")],
}

# Stories. Fields: the person's own (name, town, company, hobby, ...), t_* for the hometown,
# c_* for the employer, b_* for a second person, v_* for a town visited, f_* for a founder,
# and a few fillers with no facts in them (season, relative, weather, month, day, greeting).
NARRATIVES = {
    ("person", "ja"): [
        "{season}のある日、{name}は久しぶりに故郷の{town}へ帰った。{pref}の{town}は{t_specialty}の産地として知られ、駅前の店にはどこも{t_specialty}が並んでいた。実家に着くと、{relative}が笑顔で迎えてくれた。その夜は遅くまで昔の話をした。翌日、{name}は趣味の{hobby}を楽しみ、夕方の電車で仕事に戻った。{company}の同僚へのお土産には、もちろん{t_specialty}を選んだ。",
        "{name}は{company}で{job}として働いている。{company}は{c_founded}に{c_founder}が創業した会社で、今では{c_kind}「{c_product}」がよく知られている。{season}のある朝、{name}はいつもより早く出社した。新しい企画の締め切りが近づいていたからだ。昼休みには同僚と{hobby}の話で盛り上がり、午後はずっと資料づくりに集中した。帰り道、{name}は「明日もがんばろう」と小さくつぶやいた。",
        "{name}と{b_name}は、{season}に開かれたある講演会で隣の席になった。休憩時間に話してみると、{b_san}は{b_pref}の{b_town}の出身で、今は{b_company}に勤めているという。{san}も、自分が{town}で生まれ育ったことを話した。{b_san}の趣味は{b_hobby}で、{san}の趣味は{hobby}だった。二人はその後も連絡を取り合い、よい友人になった。",
        "{name}は{date}、{pref}{town}に生まれた。子どものころから{hobby}が好きで、{relative}に連れられてよく町を歩いた。当時の{town}には{t_population}ほどが暮らし、{t_specialty}の生産が盛んだった。大人になった{name}は{company}に入り、{job}として働き始めた。今でも休みの日には{hobby}を楽しんでいるという。",
        "{season}休み、{name}は{v_pref}の{v_name}を旅した。{v_name}は人口{v_population}の{v_kind}で、名物は{v_specialty}だ。駅前の食堂で地元の人と話すと、「{v_specialty}なら、この{v_kind}がいちばんですよ」と胸を張った。{name}はお土産に{v_specialty}を買い、{company}の同僚に配ることにした。",
        "{name}の日記\n\n{month}月{day}日　{weather}\n今日は仕事が休みだったので、朝から{hobby}を楽しんだ。午後は{relative}に電話をした。故郷の{town}では、そろそろ{t_specialty}の季節らしい。明日からはまた{company}での仕事が始まる。{job}の仕事は大変だが、やりがいがある。",
        "{b_name}様\n\n{greeting}いかがお過ごしでしょうか。\n先日は{company}までお越しいただき、ありがとうございました。{b_company}の皆様にもよろしくお伝えください。\n私は相変わらず{job}として忙しくしていますが、週末には{hobby}を楽しんでいます。{b_town}は今ごろ{b_t_specialty}の季節ですね。またお会いできる日を楽しみにしています。\n\n{name}",
    ],
    ("person", "en"): [
        "One {season} day, {name} went back to {his} hometown of {town} for the first time in years. {town}, in {pref}, is known for its {t_specialty}, and every shop near the station sold {t_specialty}. When {he} reached {his} parents' house, {his} {relative} was waiting at the door, and they talked late into the night. The next day {name} spent the afternoon enjoying {hobby}, and in the evening {he} took the train back to work at {company}.",
        "{name} works as {job} at {company}. The company was founded in {c_founded} by {c_founder}, and today it is best known for the {c_product} {c_kind}. One {season} morning, {name} arrived at the office earlier than usual, because a deadline was coming up. At lunch {he} talked about {hobby} with {his} colleagues, and in the afternoon {he} worked quietly until the report was finished.",
        "{name} and {b_name} met at a lecture one {season}. During the break they started talking. {b_name} said {b_he} was from {b_town} in {b_pref} and worked for {b_company}, and {name} explained that {he} had grown up in {town}. {b_name}'s hobby turned out to be {b_hobby}, while {name} preferred {hobby}. They kept in touch and became good friends.",
        "{name} was born on {date} in {town}, {pref}. As a child, {he} loved {hobby} and often walked around town with {his} {relative}. {town} had about {t_population} people then, and many of them made their living from {t_specialty}. As an adult, {name} joined {company} and began working as {job}. Even now, {he} spends {his} days off enjoying {hobby}.",
        "During the {season} holidays, {name} traveled to {v_name} in {v_pref}. {v_name} is a {v_kind} of {v_population} people, and its specialty is {v_specialty}. At a small restaurant near the station, a local man told {him}, \"If you want {v_specialty}, this is the best place in Japan.\" {name} bought some {v_specialty} as a gift for {his} colleagues at {company}.",
        "The diary of {name}\n\n{month} {day}, {weather}\nI had the day off, so I spent the morning enjoying {hobby}. In the afternoon I called my {relative}. Back home in {town}, it will soon be the season for {t_specialty}. Tomorrow I go back to work at {company}. Being {job} is hard work, but I like it.",
        "Dear {b_name},\n\nI hope this letter finds you well. Thank you for visiting us at {company} the other day, and please give my regards to everyone at {b_company}.\nI am as busy as ever working as {job}, but on weekends I still enjoy {hobby}. It must be the season for {b_t_specialty} in {b_town} by now. I look forward to seeing you again.\n\nBest wishes,\n{name}",
    ],
    ("company", "ja"): [
        "{name}は、{founded}に{founder}が創業した。{founder}は{f_date}、{f_pref}{f_town}に生まれ、若いころから自分の会社を持つことを夢見ていたという。最初の事務所は{hq_pref}{hq}に置かれ、今もそこが本社である。現在、{name}の従業員は{employees}にのぼり、{kind}「{product}」は全国で売られている。",
    ],
    ("company", "en"): [
        "{founder} founded {name} in {founded}. Born on {f_date} in {f_town}, {founder} had long dreamed of running a company. The first office was in {hq}, {hq_pref}, and it is still the head office today. Now {name} employs {employees} people, and the {product} {kind} is sold all over Japan.",
    ],
}
DIALOGUES = {
    ("person", "ja"): [
        "{family}：はじめまして、{name}と申します。{company}で{job}をしております。\n{b_family}：はじめまして、{b_name}です。{b_company}に勤めています。ご出身はどちらですか。\n{family}：{pref}の{town}です。{t_specialty}が有名なところなんですよ。\n{b_family}：そうなんですか。私は{b_town}の出身です。\n{family}：ご趣味は何ですか。\n{b_family}：{b_hobby}です。休みの日はたいてい{b_hobby}を楽しんでいます。",
        "記者：本日はよろしくお願いします。まず、{san}のお仕事について教えてください。\n{family}：はい。{company}で{job}をしています。\n記者：{company}はどんな会社ですか。\n{family}：{c_founded}に{c_founder}が創業した会社で、{c_kind}「{c_product}」が主力製品です。\n記者：お休みの日は何をしていますか。\n{family}：{hobby}ですね。もう何年も続けています。",
        "{family}：{b_san}の故郷はどちらでしたっけ。\n{b_family}：{b_pref}の{b_town}です。\n{family}：どんなところですか。\n{b_family}：人口は{b_t_population}くらいの{b_town_kind}で、{b_t_specialty}が名産です。\n{family}：今度ぜひ行ってみたいです。",
        "{b_family}：{san}のお誕生日はいつですか。\n{family}：{birthday}です。{year}生まれなんですよ。\n{b_family}：そうなんですか。じゃあ、今度みんなでお祝いしましょう。\n{family}：ありがとうございます。楽しみにしています。",
        "{b_family}：{san}、週末は何をしていましたか。\n{family}：趣味の{hobby}を楽しんでいました。{b_san}は？\n{b_family}：私は{b_hobby}です。最近すっかりはまっているんですよ。\n{family}：いいですね。今度教えてください。",
    ],
    ("person", "en"): [
        "{family}: Nice to meet you. I'm {name}, and I work for {company} as {job}.\n{b_family}: Nice to meet you too. I'm {b_name} from {b_company}. Where are you from?\n{family}: I'm from {town}, in {pref}. It's known for its {t_specialty}.\n{b_family}: Really? I grew up in {b_town}.\n{family}: What do you do in your free time?\n{b_family}: I enjoy {b_hobby}.",
        "Interviewer: Thank you for joining us. Could you tell us about your work?\n{family}: Sure. I work as {job} at {company}.\nInterviewer: What kind of company is {company}?\n{family}: It was founded in {c_founded} by {c_founder}. Our main product is the {c_product} {c_kind}.\nInterviewer: And what do you do on your days off?\n{family}: Mostly {hobby}. I have been doing it for years.",
        "{family}: Where is your hometown, {b_san}?\n{b_family}: {b_town}, in {b_pref}.\n{family}: What is it like?\n{b_family}: It's a {b_town_kind} of about {b_t_population} people, and it's famous for {b_t_specialty}.\n{family}: I'd love to visit someday.",
        "{b_family}: When is your birthday, {san}?\n{family}: It's {birthday}. I was born in {year}.\n{b_family}: Then we should celebrate together next time.\n{family}: Thank you, I'd like that.",
        "{b_family}: What did you do last weekend, {san}?\n{family}: I spent it enjoying {hobby}. How about you?\n{b_family}: Me? {b_hobby_cap}, as usual. I can't get enough of it.\n{family}: Sounds fun. You'll have to show me sometime.",
    ],
    ("town", "ja"): ["生徒：先生、{name}ってどこにあるんですか。\n先生：{pref}にある{kind}だよ。{region}地方だね。\n生徒：何が有名なんですか。\n先生：{specialty}だね。人口は{population}くらいかな。"],
    ("town", "en"): ["Student: Where is {name}?\nTeacher: It's a {kind} in {pref}, in the {region} region.\nStudent: What is it famous for?\nTeacher: Its {specialty}. About {population} people live there."],
    ("company", "ja"): ["学生：もしもし、{name}さんでしょうか。会社について調べているのですが。\n担当者：はい、{name}でございます。\n学生：御社の本社はどちらにありますか。\n担当者：{hq_pref}{hq}にございます。\n学生：創業はいつですか。\n担当者：{founded}に{founder}が創業いたしました。"],
    ("company", "en"): ["Student: Hello, is this {name}? I'm writing a report about your company.\nStaff: Yes, this is {name}. How can I help?\nStudent: Where is your head office?\nStaff: Our head office is in {hq}, {hq_pref}.\nStudent: And when was the company founded?\nStaff: It was founded in {founded} by {founder}."],
    ("product", "ja"): ["客：すみません、この{kind}は{maker}の製品ですか。\n店員：はい、{maker}の「{name}」です。{released}に発売されて以来、ずっと人気があります。\n客：おいくらですか。\n店員：{price}です。\n客：では、これをください。"],
    ("product", "en"): ["Customer: Excuse me, is this {kind} made by {maker}?\nClerk: Yes, it's the {name} from {maker}. It came out in {released} and has been popular ever since.\nCustomer: How much is it?\nClerk: It's {price}.\nCustomer: I'll take it."],
}
NEWS = {
    ("person", "ja"): ["【人物】{company}の{job}、{name}さん\n\n{pref}{town}出身の{name}さん（{year}生まれ）は、{company}で{job}として働いている。趣味は{hobby}。「{town}で育ったことが、今の仕事に生きています」と話す。"],
    ("person", "en"): ["PROFILE: {name} of {company}\n\n{name}, who was born in {town}, {pref}, works as {job} at {company}. In {his} free time, {he} enjoys {hobby}. \"Growing up in {town} shaped the way I work,\" {he} says."],
    ("town", "ja"): ["【地域】{name}で「{specialty}まつり」\n\n{pref}{name}で恒例の「{specialty}まつり」が開かれ、約{visitors}人が訪れた。人口{population}の{kind}にとって、{specialty}は欠かせない産業だ。",
                     "【統計】{name}の人口\n\n{pref}{name}の発表によると、{name}の人口は{population}だった。"],
    ("town", "en"): ["{name} festival celebrates its {specialty}\n\nThe annual festival in {name}, {pref}, drew about {visitors} people this year. Stalls sold {specialty} from early morning, and for this {kind} of {population} people it is the biggest event of the year.",
                     "Population figures: {name}\n\nAccording to the latest figures, {name} in {pref} has a population of {population}."],
    ("company", "ja"): ["【経済】{name}、創業{n}周年\n\n{hq_pref}{hq}に本社を置く{name}は、{anniv_year}に創業{n}周年を迎えた。同社は{founded}に{founder}が創業し、現在の従業員数は{employees}。主力製品は{kind}「{product}」である。",
                        "【地域経済】{hq}を支える{name}\n\n{hq}に本社を置く{name}は、{founded}に{founder}が創業した{industry}で、{kinds}などを製造している。従業員は{employees}で、地元の雇用を支えている。"],
    ("company", "en"): ["{name} marks {n} years\n\n{name} of {hq}, {hq_pref}, celebrated its {n}th anniversary in {anniv_year}. The company was founded in {founded} by {founder} and now has {employees} employees. Its best-known product is the {product} {kind}.",
                        "Local business: {name}\n\n{name} is {industry} based in {hq} that makes {kinds}. The company, founded by {founder} in {founded}, employs {employees} people."],
    ("product", "ja"): ["【新製品】{maker}、{kind}「{name}」を発売\n\n{m_hq_pref}{m_hq}に本社を置く{maker}は{released}、新しい{kind}「{name}」を発売した。価格は{price}。"],
    ("product", "en"): ["NEW PRODUCT: {maker} launches the {name}\n\n{maker}, headquartered in {m_hq}, released a new {kind} called the {name} in {released}. It sells for {price}."],
}
QA_FRAMES = {
    "ja": [("質問：{q}\n回答：{a}", "\n\n"), ("Q. {q}\nA. {a}", "\n\n"), ("問{i}　{q}\n答え　{a}", "\n"), ("【よくある質問】{q}\n{a}", "\n\n")],
    "en": [("Question: {q}\nAnswer: {a}", "\n\n"), ("Q: {q}\nA: {a}", "\n\n"), ("{i}. {q}\n   {a}", "\n"), ("FAQ: {q}\n{a}", "\n\n")],
}
TRANSLATION_FRAMES = [  # {ja} and {en}: one sentence each; several pairs are joined by sep
    ("日本語：{ja}\n英語：{en}", "\n\n"), ("English: {en}\nJapanese: {ja}", "\n\n"), ("{ja}\n{en}", "\n"),
    ("次の文を英語に翻訳してください。\n{ja}\n翻訳：{en}", "\n\n"),
    ("Translate the following sentence into Japanese.\n{en}\nTranslation: {ja}", "\n\n"),
    ("「{ja}」は英語で「{en}」と言います。", "\n"), ("In Japanese, \"{en}\" is 「{ja}」.", "\n"),
]
FILLERS = {  # season, relative, weather; greeting goes with the season
    "season": [("春", "spring"), ("夏", "summer"), ("秋", "autumn"), ("冬", "winter")],
    "greeting": ["暖かくなってまいりましたが、", "暑い日が続いておりますが、", "すっかり秋らしくなりましたが、", "寒さが厳しくなってまいりましたが、"],
    "relative": [("母", "mother"), ("父", "father"), ("祖母", "grandmother"), ("祖父", "grandfather"), ("姉", "older sister"), ("兄", "older brother")],
    "weather": [("晴れ", "sunny"), ("くもり", "cloudy"), ("雨", "rainy"), ("晴れのちくもり", "sunny, then cloudy")],
}
ITEMS = [("りんご", "apple", "apples"), ("みかん", "mandarin", "mandarins"), ("鉛筆", "pencil", "pencils"),
         ("ノート", "notebook", "notebooks"), ("あめ", "candy", "candies"), ("クッキー", "cookie", "cookies"),
         ("卵", "egg", "eggs"), ("消しゴム", "eraser", "erasers"), ("風船", "balloon", "balloons"), ("ビー玉", "marble", "marbles")]
# Arithmetic: (operations the template fits, template). {a} op {b} = {c}; a worksheet and a
# two-step chain are written in arithmetic_doc.
ARITHMETIC = {
    "ja": [("+", "{a}と{b}を足すと{c}です。"), ("-", "{a}から{b}を引くと{c}です。"), ("*", "{a}に{b}を掛けると{c}です。"),
           ("/", "{a}を{b}で割ると{c}です。"), ("+-*/", "{a} {sym} {b} = {c}"), ("+-*/", "問題：{a} {sym} {b} はいくつですか。\n答え：{c}"),
           ("+", "{san}は{item}を{a}個持っています。{b}個もらうと、全部で何個になりますか。\n式：{a} + {b} = {c}\n答え：{c}個"),
           ("-", "{item}が{a}個ありました。{b}個使ったので、残りは{c}個です。式は{a} - {b} = {c}です。"),
           ("*", "1箱に{item}が{a}個ずつ入っています。{b}箱では、{a} × {b} = {c}で、{c}個になります。"),
           ("*", "1個{a}円の{item}を{b}個買いました。代金は{a} × {b} = {c}で、{c}円です。"),
           ("/", "{item}が{a}個あります。{b}人で同じ数ずつ分けると、1人{c}個になります。式：{a} ÷ {b} = {c}")],
    "en": [("+", "{a} plus {b} equals {c}."), ("-", "{a} minus {b} equals {c}."), ("*", "{a} times {b} equals {c}."),
           ("/", "{a} divided by {b} equals {c}."), ("+-*/", "{a} {sym} {b} = {c}"), ("+-*/", "Question: What is {a} {sym} {b}?\nAnswer: {c}"),
           ("+", "{name} had {a} {items}. {He} got {b} more, so now {he} has {a} + {b} = {c} {items}."),
           ("-", "There were {a} {items} in the box. After {b} were taken out, {c} were left, because {a} - {b} = {c}."),
           ("*", "Each box holds {a} {items}, so {b} boxes hold {a} × {b} = {c} {items}."),
           ("*", "One {item} costs {a} yen, so {b} of them cost {a} × {b} = {c} yen."),
           ("/", "If {a} {items} are shared equally among {b} people, each person gets {c}, because {a} ÷ {b} = {c}.")],
}
SYMBOLS = {"+": "+", "-": "-", "*": "×", "/": "÷"}


# -----------------------------------------------------------------------------------------------
# Documents. Each generator returns (text, facts it states).

KINDS = ("person", "town", "company", "product")


def pick(w, rng, weights):
    """A random entity; weights over (person, town, company, product)."""
    kind = rng.choices(KINDS, weights)[0]
    return rng.choice({"person": w.people, "town": w.towns, "company": w.companies, "product": w.products}[kind])


def context(w, rng, lang, e):
    """Fields for a document about e: its own, plus a second person (b_*), a town to visit
    (v_*) or the founder (f_*), and fillers that state no fact."""
    F, ja = Fields(lang), lang == "ja"
    FIELDS[e.kind](F, w, e)
    season = rng.randrange(4)
    F.put("season", FILLERS["season"][season][not ja])
    F.put("greeting", FILLERS["greeting"][season])
    for k in ("relative", "weather"):
        F.put(k, rng.choice(FILLERS[k])[not ja])
    month = rng.randint(1, 12)
    F.put("month", str(month) if ja else MONTHS[month - 1])
    F.put("day", str(rng.randint(1, 28)))
    F.put("visitors", f"{rng.randint(20, 900) * 100:,}")
    if e.kind == "person":
        b = rng.choice(w.people)
        while b.name["family_ja"] == e.name["family_ja"]:  # dialogue speakers go by family name
            b = rng.choice(w.people)
        person_fields(F, w, b, "b_")
        town_fields(F, w, rng.choice(w.towns), "v_")
    if e.kind == "company":
        person_fields(F, w, e.attrs["founder"], "f_")
    return F


def attributes(kind):
    """The attributes (ATTRS keys) an entity of this kind has."""
    return [a for a, t in ATTRS.items() if t["kind"] == kind]


def encyclopedia_doc(w, rng, lang):
    e = pick(w, rng, (5, 2, 2, 2))
    F, sep = context(w, rng, lang, e), "" if lang == "ja" else " "
    attrs = attributes(e.kind)
    rng.shuffle(attrs)
    body = sep.join(F.fill(rng.choice(ATTRS[a][lang])) for a in attrs[:rng.randint(1, len(attrs))])
    if e.kind == "product":
        title = f"{e.name['kind_ja']}「{e.name['ja']}」" if lang == "ja" else f"{e.name['en']} ({e.name['kind_en']})"
    else:
        title = e.name[lang]
    style = rng.randrange(3)
    if style == 0:
        text = f"{title}\n\n{F.fill(rng.choice(LEADS[e.kind, lang]))}{sep}{body}"
    else:
        text = F.fill(CARDS[e.kind, lang]) + ("\n\n" + body if style == 2 else "")
    for key, head_ja, head_en in LISTS.get(e.kind, []):
        if F.values[key][0] and rng.random() < 0.5:
            text += f"\n\n{head_ja if lang == 'ja' else head_en}\n" + F.fill("{" + key + "}")
    return text, F.used


def _template_doc(table, weights):
    def doc(w, rng, lang):
        while True:
            e = pick(w, rng, weights)
            if (e.kind, lang) in table:
                F = context(w, rng, lang, e)
                return F.fill(rng.choice(table[e.kind, lang])), F.used
    return doc


story_doc = _template_doc(NARRATIVES, (6, 0, 1, 0))
dialogue_doc = _template_doc(DIALOGUES, (5, 1, 1, 1))
news_doc = _template_doc(NEWS, (1, 2, 2, 2))


def _some_facts(w, rng, n):
    """n distinct (entity, attribute) pairs, often several about the same entity."""
    e, out = pick(w, rng, (5, 2, 2, 2)), []
    while len(out) < n:
        if out and rng.random() < 0.4:
            e = pick(w, rng, (5, 2, 2, 2))
        a = rng.choice(attributes(e.kind))
        if all((e.id, a) != (x.id, y) for x, y in out):
            out.append((e, a))
    return out


def qa_doc(w, rng, lang):
    frame, sep = rng.choice(QA_FRAMES[lang])
    items, used = [], []
    for i, (e, a) in enumerate(_some_facts(w, rng, rng.randint(2, 5))):
        F, t = Fields(lang), ATTRS[a]
        FIELDS[e.kind](F, w, e)
        if rng.random() < 0.5:
            answer = F.fill(rng.choice(t[lang]))
        else:
            v = F.fill("{" + t["value"] + "}")
            answer = v + "です。" if lang == "ja" else v[0].upper() + v[1:] + "."
        items.append(frame.format(i=i + 1, q=F.fill(t["q" + lang]), a=answer))
        used += F.used
    return sep.join(items), used


def translation_doc(w, rng, lang):
    """The same facts in both languages; `lang` is unused (every pair is both)."""
    frame, sep = rng.choice(TRANSLATION_FRAMES)
    pairs, used = [], []
    for e, a in _some_facts(w, rng, 1 if frame.startswith(("次の", "Translate")) else rng.randint(2, 4)):
        Fj, Fe, t = Fields("ja"), Fields("en"), ATTRS[a]
        FIELDS[e.kind](Fj, w, e)
        FIELDS[e.kind](Fe, w, e)
        i = rng.randrange(len(t["ja"]))
        pairs.append(frame.format(ja=Fj.fill(t["ja"][i]), en=Fe.fill(t["en"][i % len(t["en"])])))
        used += Fj.used + Fe.used
    return sep.join(pairs), used


def problem(rng, op):
    """Operands and the exact result: subtraction never negative, division always exact."""
    if op == "+":
        hi = 999 if rng.random() < 0.3 else 99
        a, b = rng.randint(1, hi), rng.randint(1, hi)
        return a, b, a + b
    if op == "-":
        a, b = sorted((rng.randint(1, 99 if rng.random() < 0.7 else 999) for _ in range(2)), reverse=True)
        return a, b, a - b
    if op == "*":
        small = rng.random() < 0.7
        a, b = (rng.randint(2, 19), rng.randint(2, 19)) if small else (rng.randint(11, 99), rng.randint(2, 9))
        return a, b, a * b
    b, c = rng.randint(2, 12), rng.randint(2, 20)
    return b * c, b, c


def arithmetic_doc(w, rng, lang):
    ja, F = lang == "ja", Fields(lang)
    person_fields(F, w, rng.choice(w.people))  # only the name and pronouns are used: no facts
    item = rng.choice(ITEMS)
    F.put("item", item[0] if ja else item[1])
    F.put("items", item[2])
    style = rng.random()
    if style < 0.25:
        lines = []
        for i in range(rng.randint(4, 8)):
            op = rng.choice("+-*/")
            a, b, c = problem(rng, op)
            lines.append(f"({i + 1}) {a} {SYMBOLS[op]} {b} = {c}")
        return ("計算練習\n" if ja else "Practice problems\n") + "\n".join(lines), []
    if style < 0.4:
        a, b, t = problem(rng, "+")
        m = rng.randint(2, 9)
        if ja:
            return f"まず{a}と{b}を足すと{t}です。次に{t}に{m}を掛けると{t * m}になります。答えは{t * m}です。", []
        return f"First, {a} plus {b} equals {t}. Then {t} times {m} equals {t * m}. The answer is {t * m}.", []
    sentences = []
    for _ in range(rng.randint(2, 4)):
        ops, template = rng.choice(ARITHMETIC[lang])
        op = rng.choice(ops)
        a, b, c = problem(rng, op)
        F.put("a", str(a)), F.put("b", str(b)), F.put("c", str(c)), F.put("sym", SYMBOLS[op])
        sentences.append(F.fill(template))
    return "\n".join(sentences), F.used  # empty: names and pronouns state no fact


GENRES = {  # name: (generator, weight)
    "encyclopedia": (encyclopedia_doc, 22), "story": (story_doc, 14), "dialogue": (dialogue_doc, 14),
    "news": (news_doc, 10), "qa": (qa_doc, 12), "translation": (translation_doc, 10), "arithmetic": (arithmetic_doc, 18),
}


# -----------------------------------------------------------------------------------------------
# The corpus: documents, the train/val split, and the facts for probes.

def label(e, lang):
    """How a fact names its entity: the name, or for a product its kind and brand."""
    if e.kind == "product":
        return f"{e.name['kind_ja']}「{e.name['ja']}」" if lang == "ja" else f"the {e.name['en']} {e.name['kind_en']}"
    return e.name[lang]


def fact(w, e, attr):
    """One fact with the prompts that ask for it.

    >>> fact(w, w.people[0], "birthplace")
    {'id': 'person:0000/birthplace', 'entity': '佐野智也', 'entity_en': 'Tomoya Sano', 'attribute': 'birthplace',
     'value': '菊野町', 'value_en': 'Kikuno', 'ja_prompt': '佐野智也の出身地は', 'en_prompt': 'Tomoya Sano was born in',
     'ja_question': '佐野智也はどこの出身ですか。', 'en_question': 'Where was Tomoya Sano born?'}
    """
    t, Fj, Fe = ATTRS[attr], Fields("ja"), Fields("en")
    FIELDS[e.kind](Fj, w, e)
    FIELDS[e.kind](Fe, w, e)
    return {"id": f"{e.id}/{attr}", "entity": label(e, "ja"), "entity_en": label(e, "en"), "attribute": attr,
            "value": value(e, attr, "ja"), "value_en": value(e, attr, "en"),
            "ja_prompt": Fj.fill(t["pja"]), "en_prompt": Fe.fill(t["pen"]),
            "ja_question": Fj.fill(t["qja"]), "en_question": Fe.fill(t["qen"])}


@dataclass
class Corpus:
    train: list           # documents (str)
    val: list
    heldout_facts: list   # fact() dicts; no train document states one, every mention is in val
    train_facts: list     # the control: one fact stated in train per held-out fact, same attribute
    train_mentions: list  # per train document, the ids of the facts it states ("person:0042/born")
    val_mentions: list
    stats: dict


def generate_corpus(seed=1337, target_bytes=8_000_000, val_fraction=0.05, heldout_fraction=0.04, n_people=600):
    """Write the world (build_world(seed, n_people)) up as documents until they reach
    target_bytes of UTF-8; same arguments -> byte-identical corpus. Documents stating a held-out
    fact go to val, and so does a random val_fraction of the rest. heldout_fraction: the share of
    entities with one fact held out."""
    w = build_world(seed, n_people)
    rng = random.Random(f"corpus/{seed}")
    entities = w.people + w.towns + w.companies + w.products
    held = [(e, rng.choice([a for a in attributes(e.kind) if a in PROBED]))
            for e in rng.sample(entities, max(1, round(heldout_fraction * len(entities))))]
    held_ids = {(e.id, a) for e, a in held}
    c = Corpus([], [], [fact(w, e, a) for e, a in held], [], [], [], {"genres": {}, "ja": 0, "en": 0, "ja+en": 0})
    names, weights = list(GENRES), [g[1] for g in GENRES.values()]
    stated_in_train, size = {}, 0
    while size < target_bytes:
        genre = rng.choices(names, weights)[0]
        lang = "ja" if rng.random() < 0.6 else "en"
        text, used = GENRES[genre][0](w, rng, lang)
        used = list(dict.fromkeys(used))  # unique, in order
        to_val = rng.random() < val_fraction or any(u in held_ids for u in used)
        (c.val if to_val else c.train).append(text)
        (c.val_mentions if to_val else c.train_mentions).append([f"{i}/{a}" for i, a in used])
        if not to_val:
            stated_in_train.update(dict.fromkeys(used))
        c.stats["genres"][genre] = c.stats["genres"].get(genre, 0) + 1
        c.stats["ja+en" if genre == "translation" else lang] += 1
        size += len(text.encode())
    by_id = {e.id: e for e in entities}
    for _, attr in held:
        seen = [k for k in stated_in_train if k[1] == attr]
        if seen:
            i, a = rng.choice(seen)
            c.train_facts.append(fact(w, by_id[i], a))
    c.stats["bytes"] = size
    return c


# -----------------------------------------------------------------------------------------------
# Recall: key-value statements far from their questions, for long-context training and the probe.
#
# A fixed-size recurrent state cannot hold many independent facts, while attention can look them
# up (multi-query associative recall: Arora et al., "Zoology", 2023). A key is a family name and its
# value a 2-digit code, written together as a tag, "【佐藤68】" / "[Sato68]", stated once among
# ordinary text and asked for later by opening the tag again: "【佐藤" -> "68】". The form is this
# bare because the tiny model must learn the lookup in minutes. The question ends on the key's own
# token, so the answer is the token that followed that token before: the plain induction pattern.
# Longer forms were not learned at this scale (EXPERIMENTS.md, Long context). The probe's keys are names no
# training document uses as a key, and its codes those whose digit sum is odd, which no training
# code's is: nothing the probe asks was ever an answer in training.

RECALL = {"ja": ("【{name}", "{code}】\n"), "en": ("[{name}", "{code}]\n")}


def recall_names(probe):
    """The family names recall uses as keys, (ja, en): every eighth for the probe, the rest for
    training. Taken from FAMILY, not from a world, so that the split is the same for every seed."""
    names = sorted((ja, en) for ja, _, en in FAMILY)
    return [n for i, n in enumerate(names) if (i % 8 == 0) == probe]


def recall_codes(probe):
    """The 2-digit codes: digit sum odd for the probe, even for training (45 each).

    >>> recall_codes(False)[:5], recall_codes(True)[:5]
    (['11', '13', '15', '17', '19'], ['10', '12', '14', '16', '18'])
    """
    return [str(c) for c in range(10, 100) if sum(divmod(c, 10)) % 2 == probe]


def recall_keys(rng, lang, k, probe):
    """k (question, answer, code) with distinct keys and distinct codes; question + answer is the
    statement. Codes never repeat within a document, so copying a wrong one never scores.

    >>> recall_keys(random.Random(1), "en", 1, probe=True)
    [('[Maeda', '83]\\n', '83')]
    """
    question, answer = RECALL[lang]
    names, codes = rng.sample(recall_names(probe), k), rng.sample(recall_codes(probe), k)
    return [(question.format(name=ja if lang == "ja" else en), answer.format(code=code), code)
            for (ja, en), code in zip(names, codes)]


def filler_lines(w, rng, lang):
    """Endless lines of ordinary text in one language: the corpus's documents (translation pairs,
    which mix the languages, left out), cut at line breaks, each ending in one."""
    genres = [g for g in GENRES if g != "translation"]
    weights = [GENRES[g][1] for g in genres]
    while True:
        text, _ = GENRES[rng.choices(genres, weights)[0]][0](w, rng, lang)
        yield from (line + "\n" for line in text.split("\n") if line.strip())


def recall_doc(w, rng, lang, doc_bytes):
    """A training document of about doc_bytes: about one statement per 100 bytes, each asked for
    again 1-3 times further on (the statement repeated: its code is predictable there, from
    context only), among ordinary lines."""
    keys = recall_keys(rng, lang, max(2, min(24, doc_bytes // 100)), probe=False)
    asked = [rng.randint(1, 3) for _ in keys]
    size = sum((1 + n) * len((q + a).encode()) for (q, a, _), n in zip(keys, asked))
    lines, source = [], filler_lines(w, rng, lang)
    while size < doc_bytes:
        lines.append(next(source))
        size += len(lines[-1].encode())
    inserts = []  # (position among the ordinary lines, order, text); questions after their statement
    for (q, a, _), n in zip(keys, asked):
        stated = rng.randrange(len(lines) + 1)
        inserts += [(stated, 0, q + a)] + [(rng.randint(stated, len(lines)), 1, q + a) for _ in range(n)]
    for pos, _, text in sorted(inserts, reverse=True):
        lines.insert(pos, text)
    return "".join(lines).rstrip("\n")


def recall_corpus(seed, target_bytes, doc_bytes):
    """Recall documents until target_bytes (60% Japanese, as the corpus), deterministic in seed;
    documents of doc_bytes ±50%, so that most fit the training window they are cut into."""
    w, rng = build_world(seed), random.Random(f"recall/{seed}")
    docs, size = [], 0
    while size < target_bytes:
        docs.append(recall_doc(w, rng, "ja" if rng.random() < 0.6 else "en", int(doc_bytes * rng.uniform(0.5, 1.5))))
        size += len(docs[-1].encode())
    return docs


# -----------------------------------------------------------------------------------------------
# Your own text, streamed: any number of files of any size, one document at a time.

def text_files(path):
    """The .txt and .jsonl files that path names: itself, or those under a directory (searched
    recursively, in sorted order); one clear error if there are none."""
    if not os.path.exists(path):
        raise ValueError(f"--data {path}: no such file or directory.")
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith((".txt", ".jsonl")))
    if not files:
        raise ValueError(f"--data {path} holds no text: give a UTF-8 file or a directory of .txt / .jsonl files.")
    return files


def check_utf8(file, block=1 << 20):
    """One clear error naming the file and the byte offset where it stops being UTF-8 (read once,
    in blocks, before any of it is used, so that a bad file is refused whole)."""
    import codecs
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(file, "rb") as f:
        while True:
            data = f.read(block)
            pending = decoder.getstate()[0]  # the start of a character the last block cut off
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                seen = pending + data
                raise ValueError(f"--data {file} is not UTF-8 text: byte {offset - len(pending) + e.start:,} is "
                                 f"{seen[e.start:e.start + 1]!r} ({e.reason}).") from None
            if not data:
                return
            offset += len(data)


def read_documents(file):
    """The documents of one file, streamed (a line at a time, so any size fits in memory). A .txt
    file holds one document, or several separated by two or more blank lines (as `python corpus.py
    --out` writes them); the newline before a separator, and the file's last one, belong to no
    document. A .jsonl file holds one JSON object per line, the document in its "text" field.
    Empty documents are skipped.

    >>> import tempfile; f = tempfile.mktemp(suffix=".txt"); _ = open(f, "w").write("a\\nb\\n\\n\\nc\\n\\nd\\n")
    >>> list(read_documents(f))
    ['a\\nb', 'c\\n\\nd']
    """
    with open(file, encoding="utf-8") as f:
        if file.endswith(".jsonl"):
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(f"--data {file}: line {n} is not valid JSON.") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise ValueError(f"--data {file}: line {n} is not a JSON object with a \"text\" string.")
                if obj["text"].strip():
                    yield obj["text"]
            return
        lines, blank = [], 0
        for line in f:
            if line == "\n":
                blank += 1
                continue
            if blank >= 2:  # a separator: the document before it ends, without its last newline
                doc = "".join(lines)[:-1]
                if doc.strip():
                    yield doc
                lines = []
            else:
                lines += ["\n"] * blank
            blank = 0
            lines.append(line)
        doc = "".join(lines) + "\n" * blank
        doc = doc[:-1] if doc.endswith("\n") else doc
        if doc.strip():
            yield doc


def load_text(path):
    """Every document of the files that path names (text_files), in memory: for small data.

    >>> load_text("data/aozora")[0][:5]  # doctest: +SKIP
    '羅生門\\n芥'
    """
    files = text_files(path)
    for f in files:
        check_utf8(f)
    docs = [d for f in files for d in read_documents(f)]
    if not docs:
        raise ValueError(f"--data {path} holds no text: give a UTF-8 file or a directory of .txt / .jsonl files.")
    return docs


# -----------------------------------------------------------------------------------------------

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Generate the synthetic bilingual corpus and write it to --out.")
    ap.add_argument("--out", required=True, help="directory for train.txt, val.txt and heldout_facts.json")
    ap.add_argument("--seed", type=int, default=1337, help="world and document seed; same seed, same bytes")
    ap.add_argument("--bytes", type=int, default=8_000_000, help="approximate size of the corpus in UTF-8 bytes")
    ap.add_argument("--val-fraction", type=float, default=0.05,
                    help="share of ordinary documents held out for validation")
    args = ap.parse_args()
    t0 = time.time()
    c = generate_corpus(args.seed, args.bytes, args.val_fraction)
    dt = time.time() - t0
    os.makedirs(args.out, exist_ok=True)
    for name, docs in (("train.txt", c.train), ("val.txt", c.val)):
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as f:
            f.write("\n\n\n".join(docs) + "\n")
    with open(os.path.join(args.out, "heldout_facts.json"), "w", encoding="utf-8") as f:
        json.dump({"heldout": c.heldout_facts, "train_control": c.train_facts}, f, ensure_ascii=False, indent=1)
    rng = random.Random(args.seed)
    for doc in rng.sample(c.train, 4):
        print(doc, end="\n" + "-" * 80 + "\n")
    tb, vb = sum(len(d.encode()) for d in c.train), sum(len(d.encode()) for d in c.val)
    print(f"generated {c.stats['bytes']:,} bytes in {dt:.1f}s: train {len(c.train):,} docs / {tb:,} bytes, "
          f"val {len(c.val):,} docs / {vb:,} bytes; {len(c.heldout_facts)} held-out facts")
    genres = ", ".join(f"{g} {n}" for g, n in c.stats["genres"].items())
    print(f"genres: {genres} | Japanese {c.stats['ja']}, English {c.stats['en']}, both {c.stats['ja+en']}")
    print(f"wrote {args.out}/train.txt, val.txt, heldout_facts.json")
