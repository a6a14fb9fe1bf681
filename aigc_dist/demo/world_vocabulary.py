"""The vocabulary of the synthetic world: categories, brands, interests, segments, copy phrasing.

Plain data, kept apart from the generator in `synthetic.py`. The personalization and grounding
metrics read `SEGMENT_PHRASES` and `CATEGORY_NAMES` from here.
"""

from __future__ import annotations

from typing import NamedTuple

SEGMENTS = ("student", "parent", "traveler", "gamer", "professional", "retiree", "athlete", "foodie")
AGE_BANDS = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")


class CategorySpec(NamedTuple):
    zh: str  # display name in Chinese copy
    descriptors: tuple[str, ...]  # middle word of English titles
    nouns: tuple[tuple[str, str], ...]  # (English, Chinese) product nouns
    attributes: tuple[str, ...]  # attribute keys, see ATTRIBUTE_NAMES
    median_price: float


# No title word, attribute or phrase contains a category name (in either language): the grounding
# metric must not be satisfied by the copy of an item from another category.
CATEGORY_SPECS: dict[str, CategorySpec] = {
    "electronics": CategorySpec("电子产品", ("Pulse", "Volt", "Echo"),
        (("Earbuds", "蓝牙耳机"), ("Speaker", "音箱"), ("Power Bank", "充电宝"), ("Smartwatch", "智能手表")),
        ("wireless", "fast-charging", "compact", "noise-cancelling", "long-lasting"), 90.0),
    "outdoor": CategorySpec("户外", ("Trail", "Alpine", "Ridge"),
        (("Backpack", "背包"), ("Tent", "帐篷"), ("Lantern", "营地灯"), ("Hiking Poles", "登山杖")),
        ("waterproof", "lightweight", "packable", "durable", "windproof"), 70.0),
    "kitchen": CategorySpec("厨房", ("Copper", "Crisp", "Simmer"),
        (("Frying Pan", "平底锅"), ("Knife Set", "刀具套装"), ("Blender", "搅拌机"), ("Kettle", "电水壶")),
        ("non-stick", "dishwasher-safe", "rust-proof", "compact", "easy-clean"), 40.0),
    "books": CategorySpec("图书", ("Story", "Atlas", "Chronicle"),
        (("Novel", "小说"), ("Travel Guide", "旅行指南"), ("Anthology", "诗集"), ("Cookbook", "菜谱")),
        ("illustrated", "bestselling", "hardcover", "pocket-size", "award-winning"), 18.0),
    "toys": CategorySpec("玩具", ("Jolly", "Wonder", "Tiny"),
        (("Puzzle", "拼图"), ("Building Blocks", "积木"), ("Plush Bear", "毛绒熊"), ("Kite", "风筝")),
        ("educational", "colourful", "kid-safe", "wooden", "creative"), 25.0),
    "beauty": CategorySpec("美妆", ("Glow", "Silk", "Bloom"),
        (("Face Serum", "精华液"), ("Lip Balm", "润唇膏"), ("Hand Cream", "护手霜"), ("Sunscreen", "防晒霜")),
        ("fragrance-free", "gentle", "vegan", "hydrating", "travel-size"), 22.0),
    "sports": CategorySpec("运动", ("Sprint", "Peak", "Stride"),
        (("Yoga Mat", "瑜伽垫"), ("Running Shoes", "跑鞋"), ("Dumbbells", "哑铃"), ("Jump Rope", "跳绳")),
        ("breathable", "lightweight", "durable", "adjustable", "quick-dry"), 45.0),
    "home": CategorySpec("家居", ("Nest", "Hearth", "Calm"),
        (("Throw Blanket", "毛毯"), ("Candle", "香薰蜡烛"), ("Plant Pot", "花盆"), ("Wall Clock", "挂钟")),
        ("cosy", "handmade", "minimalist", "eco-friendly", "durable"), 35.0),
    "fashion": CategorySpec("服饰", ("Urban", "Linen", "Classic"),
        (("Denim Jacket", "牛仔外套"), ("Scarf", "围巾"), ("Tote Bag", "托特包"), ("Sunglasses", "太阳镜")),
        ("breathable", "timeless", "slim-fit", "recycled", "all-season"), 55.0),
    "games": CategorySpec("游戏", ("Quest", "Dice", "Tactic"),
        (("Board Game", "桌游"), ("Card Deck", "卡牌"), ("Puzzle Box", "解谜盒"), ("Controller", "手柄")),
        ("co-op", "family-friendly", "strategic", "portable", "award-winning"), 40.0),
}
CATEGORIES = tuple(CATEGORY_SPECS)
CATEGORY_NAMES: dict[str, dict[str, str]] = {
    "en": {c: c for c in CATEGORIES},
    "zh": {c: v.zh for c, v in CATEGORY_SPECS.items()},
}
ATTRIBUTE_NAMES: dict[str, dict[str, str]] = {"zh": {
    "wireless": "无线", "fast-charging": "快充", "compact": "小巧", "noise-cancelling": "降噪",
    "long-lasting": "长续航", "waterproof": "防水", "lightweight": "轻便", "packable": "易收纳",
    "durable": "耐用", "windproof": "防风", "non-stick": "不粘锅", "dishwasher-safe": "可机洗",
    "rust-proof": "防锈", "easy-clean": "易清洁", "illustrated": "插图版", "bestselling": "畅销",
    "hardcover": "精装", "pocket-size": "口袋本", "award-winning": "获奖", "educational": "益智",
    "colourful": "色彩缤纷", "kid-safe": "儿童安全", "wooden": "木质", "creative": "创意",
    "fragrance-free": "无香", "gentle": "温和", "vegan": "纯素", "hydrating": "保湿",
    "travel-size": "旅行装", "breathable": "透气", "adjustable": "可调节", "quick-dry": "速干",
    "cosy": "温馨", "handmade": "手工", "minimalist": "极简", "eco-friendly": "环保", "timeless": "经典",
    "slim-fit": "修身", "recycled": "再生材料", "all-season": "四季可用", "co-op": "合作模式",
    "family-friendly": "老少皆宜", "strategic": "烧脑", "portable": "便携",
}}
ATTRIBUTE_NAMES["en"] = {a: a for a in ATTRIBUTE_NAMES["zh"]}
BRANDS = (("Aurora", "极光"), ("Summit", "峰顶"), ("Nimbus", "云朵"), ("Cedar", "雪松"), ("Lumen", "流光"),
          ("Harbor", "港湾"), ("Velvet", "丝绒"), ("Ember", "余烬"), ("Nova", "新星"), ("Willow", "柳影"),
          ("Zephyr", "和风"), ("Maple", "枫叶"))

# Interest tags each point at one category; candidates lean towards the categories of a user's interests.
INTEREST_CATEGORY: dict[str, str] = {
    "gadgets": "electronics", "photography": "electronics", "hiking": "outdoor", "camping": "outdoor",
    "cooking": "kitchen", "coffee": "kitchen", "baking": "kitchen", "reading": "books", "history": "books",
    "crafts": "toys", "puzzles": "toys", "skincare": "beauty", "makeup": "beauty", "running": "sports",
    "fitness": "sports", "cycling": "sports", "decor": "home", "gardening": "home", "style": "fashion",
    "sneakers": "fashion", "gaming": "games", "board games": "games",
}
INTERESTS = tuple(INTEREST_CATEGORY)


class SegmentProfile(NamedTuple):
    interests: tuple[str, ...]  # tags this segment picks more often
    age_weights: tuple[float, ...]  # over AGE_BANDS
    price_sensitivity: float  # mean, in [0, 1]


SEGMENT_PROFILES: dict[str, SegmentProfile] = {
    "student": SegmentProfile(("gaming", "reading", "gadgets", "sneakers", "coffee"), (8, 2, 0.2, 0, 0, 0), 0.8),
    "parent": SegmentProfile(("cooking", "crafts", "puzzles", "decor", "baking"), (0.2, 4, 5, 2, 0.5, 0.1), 0.6),
    "traveler": SegmentProfile(("hiking", "camping", "photography", "style"), (2, 5, 3, 2, 1, 1), 0.5),
    "gamer": SegmentProfile(("gaming", "board games", "gadgets", "puzzles"), (5, 5, 2, 1, 0.2, 0.1), 0.5),
    "professional": SegmentProfile(("coffee", "gadgets", "style", "fitness", "reading"), (1, 5, 5, 3, 1, 0), 0.25),
    "retiree": SegmentProfile(("gardening", "reading", "history", "cooking", "puzzles"), (0, 0, 0, 0, 2, 8), 0.55),
    "athlete": SegmentProfile(("running", "fitness", "cycling", "hiking"), (4, 5, 3, 1, 0.5, 0.2), 0.4),
    "foodie": SegmentProfile(("cooking", "baking", "coffee", "gardening"), (1, 4, 4, 3, 2, 1), 0.4),
}

# locale -> segment -> phrases. The personalization metric looks for these; no phrase is a substring
# of another segment's phrase, so copy written for one segment never passes for another.
SEGMENT_PHRASES: dict[str, dict[str, list[str]]] = {"en": {
    "student": ["perfect for campus life", "a smart buy on a student budget", "made for late-night study"],
    "parent": ["a favourite for the whole family", "made for busy parents", "loved by kids and parents"],
    "traveler": ["ready for your next adventure", "built for life on the road", "a must-pack for every trip"],
    "gamer": ["made to level up your setup", "built for marathon gaming sessions", "a win for every player"],
    "professional": ["made for busy workdays", "a sharp choice for the office", "built for your commute"],
    "retiree": ["perfect for slow mornings", "a treat for your golden years", "made for relaxed hobbies"],
    "athlete": ["built to keep up with your training", "ready for race day", "made for serious workouts"],
    "foodie": ["a treat for true food lovers", "made for adventurous cooks", "a delight for flavour seekers"],
}, "zh": {
    "student": ["校园生活好搭档", "学生党的超值之选", "陪你熬夜复习"],
    "parent": ["全家人都喜欢", "忙碌爸妈的好帮手", "大人小孩都爱"],
    "traveler": ["说走就走的旅行必备", "旅途中的可靠伙伴", "每次出行都要带上"],
    "gamer": ["让你的装备再升级", "为通宵开黑而生", "每位玩家的胜利之选"],
    "professional": ["忙碌工作日的得力助手", "办公室里的精致之选", "让通勤更轻松"],
    "retiree": ["享受悠闲慢时光", "退休生活的贴心礼物", "陪你安享兴趣爱好"],
    "athlete": ["跟得上你的训练节奏", "为比赛日做好准备", "专为高强度训练打造"],
    "foodie": ["真正吃货的心头好", "爱下厨的你一定喜欢", "为美味探索者而生"],
}}
# Slots: {title} {category} {attribute} {phrase}; all in the user's locale except the item's title.
COPY_FORMATS: dict[str, tuple[str, ...]] = {
    "en": ("Meet the {title}: {phrase}, and {attribute} too.",
           "New in {category}: the {title}, {phrase}.",
           "The {title} is {phrase}. Expect it to be {attribute}.",
           "Top pick in {category}: {title}. It's {attribute} and {phrase}."),
    "zh": ("为你精选{title}：{phrase}，{attribute}又实用。",
           "{category}新品：{title}，{phrase}。",
           "推荐{title}：{attribute}，{phrase}！",
           "{category}热卖：{title}，{attribute}，{phrase}。"),
}
